"""Visual-quality metrics: SSIM, LPIPS availability (never downloading), perturbation maps and figures."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from preempt_cli.errors import ConfigError, ImageWriteError, MissingDependencyError, PreemptError
from preempt_cli.quality import (
    LPIPS_NETS,
    LpipsUnavailableError,
    load_lpips,
    lpips_distance,
    lpips_status,
    perturbation_map,
    save_perturbation_figure,
    ssim,
)

EPS = 8 / 255


def _rand(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# -- SSIM -------------------------------------------------------------------------------------------------


def _reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. 2004, written out: one 11x11 Gaussian-weighted window at every valid position."""
    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    window = np.outer(g, g)
    window /= window.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[ch, i : i + 11, j : j + 11], b[ch, i : i + 11, j : j + 11]
                ma, mb = (window * pa).sum(), (window * pb).sum()
                va = (window * (pa - ma) ** 2).sum()
                vb = (window * (pb - mb) ** 2).sum()
                cov = (window * (pa - ma) * (pb - mb)).sum()
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_identical_is_one(channels: int) -> None:
    x = _rand((3, channels, 32, 32))
    out = ssim(x, x)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_reference(channels: int) -> None:
    x = _rand((2, channels, 16, 19), seed=1)
    y = (x + 0.2 * _rand(x.shape, seed=2) - 0.1).clamp(0, 1)
    out = ssim(x, y)
    expected = [_reference_ssim(x[i].double().numpy(), y[i].double().numpy()) for i in range(2)]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_ssim_known_value_for_constant_images() -> None:
    # Zero variance: the structure term is C2 / C2 = 1, leaving the luminance term.
    a, b = 0.3, 0.7
    x = torch.full((1, 3, 12, 12), a)
    y = torch.full((1, 3, 12, 12), b)
    c1 = 0.01**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)


def test_ssim_data_range() -> None:
    x = _rand((2, 3, 16, 16), seed=3)
    y = (x + 0.1 * _rand(x.shape, seed=4)).clamp(0, 1)
    assert torch.allclose(ssim(x * 255, y * 255, data_range=255.0), ssim(x, y), atol=1e-6)


def test_ssim_decreases_with_noise_and_is_symmetric() -> None:
    x = _rand((4, 3, 32, 32), seed=5) * 0.5 + 0.25
    noise = _rand(x.shape, seed=6) * 2 - 1
    values = [ssim(x, (x + level * noise).clamp(0, 1)) for level in (0.01, 0.05, 0.1, 0.3)]
    for lower_noise, higher_noise in zip(values, values[1:]):
        assert (higher_noise < lower_noise).all()
    y = (x + 0.1 * noise).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-7)


def test_ssim_of_no_pairs_is_empty() -> None:
    empty = torch.zeros(0, 3, 32, 32)
    out = ssim(empty, empty)
    assert out.shape == (0,) and out.dtype == empty.dtype


def test_ssim_bad_inputs() -> None:
    x = _rand((1, 3, 16, 16))
    with pytest.raises(ConfigError):
        ssim(x, x[:, :1])
    with pytest.raises(ConfigError):
        ssim(x[0], x[0])
    with pytest.raises(ConfigError, match="11x11"):
        ssim(x[..., :10, :10], x[..., :10, :10])
    with pytest.raises(ConfigError):
        ssim(x, x, data_range=0)


# -- LPIPS ------------------------------------------------------------------------------------------------


def test_lpips_status_here_does_not_raise() -> None:
    ok, reason = lpips_status()
    assert isinstance(ok, bool) and isinstance(reason, str)
    if ok:
        pytest.skip("LPIPS is usable on this machine: nothing to check about its absence")
    assert reason
    x = _rand((1, 3, 32, 32))
    with pytest.raises(LpipsUnavailableError) as info:
        lpips_distance(x, x)
    assert reason in str(info.value)


def test_lpips_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` raise ImportError
    ok, reason = lpips_status()
    assert not ok
    assert "not installed" in reason and "pip install lpips" in reason
    x = _rand((1, 3, 32, 32))
    with pytest.raises(MissingDependencyError, match="pip install lpips") as info:
        lpips_distance(x, x)
    assert isinstance(info.value, LpipsUnavailableError)
    assert isinstance(info.value, ImportError) and isinstance(info.value, PreemptError)
    assert info.value.package == "lpips"


class _FakeLPIPS(nn.Module):
    """Stands in for ``lpips.LPIPS``: mean absolute difference of [-1, 1] images, shaped [B, 1, 1, 1]."""

    built: list[dict] = []

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        type(self).built.append(kwargs)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, a: torch.Tensor, b: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        assert a.shape[1] == 3
        if normalize:
            a, b = 2 * a - 1, 2 * b - 1
        return (self.scale * (a - b).abs()).mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def fake_lpips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in ``lpips`` package with its linear weights, and an empty torch hub dir (returned)."""
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    for net in LPIPS_NETS:
        (package / "weights" / "v0.1" / f"{net}.pth").write_bytes(b"linear layers")
    module = types.ModuleType("lpips")
    module.__file__ = str(package / "__init__.py")
    module.LPIPS = _FakeLPIPS  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lpips", module)
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    _FakeLPIPS.built.clear()
    return hub


def test_lpips_backbone_not_cached_is_reported_and_nothing_is_built(fake_lpips: Path) -> None:
    ok, reason = lpips_status("alex")
    assert not ok
    assert "torch hub cache" in reason and str(fake_lpips / "checkpoints" / LPIPS_NETS["alex"]) in reason
    x = _rand((2, 3, 32, 32))
    with pytest.raises(LpipsUnavailableError, match="torch hub cache"):
        lpips_distance(x, x)
    assert _FakeLPIPS.built == []  # never constructed, so nothing could try to download


def test_lpips_used_when_backbone_cached(fake_lpips: Path) -> None:
    (fake_lpips / "checkpoints").mkdir()
    (fake_lpips / "checkpoints" / LPIPS_NETS["alex"]).write_bytes(b"alexnet")
    assert lpips_status("alex") == (True, "")
    assert not lpips_status("vgg")[0]  # only the alex backbone is cached
    x = _rand((2, 3, 32, 32), seed=1)
    y = (x + 0.1).clamp(0, 1)
    dist = lpips_distance(x, y)
    assert dist.shape == (2,) and dist.dtype == torch.float32
    assert torch.allclose(dist, (2 * (y - x)).abs().mean(dim=(1, 2, 3)), atol=1e-6)
    assert _FakeLPIPS.built[0]["net"] == "alex" and _FakeLPIPS.built[0]["pretrained"] is True
    gray = lpips_distance(x[:, :1], y[:, :1], model=load_lpips("alex"))
    assert gray.shape == (2,)
    assert torch.allclose(lpips_distance(x, x), torch.zeros(2))


def test_lpips_bad_settings() -> None:
    with pytest.raises(ConfigError):
        lpips_status("resnet")
    x = _rand((1, 4, 32, 32))
    with pytest.raises(ConfigError):
        lpips_distance(x, x)


# -- perturbation maps ------------------------------------------------------------------------------------


def test_perturbation_map_levels() -> None:
    x = _rand((2, 3, 8, 8)) * 0.5 + 0.25
    zero = perturbation_map(x, x, EPS)
    assert zero.shape == (2, 1, 8, 8) and zero.dtype == torch.float32
    assert torch.allclose(zero, torch.full_like(zero, 0.5), atol=1e-6)
    assert torch.allclose(perturbation_map(x, x + EPS, EPS), torch.ones_like(zero), atol=1e-5)
    assert torch.allclose(perturbation_map(x, x - EPS, EPS), torch.zeros_like(zero), atol=1e-5)
    assert torch.allclose(perturbation_map(x, x + EPS / 2, EPS), torch.full_like(zero, 0.75), atol=1e-5)
    # beyond the budget: clipped
    assert torch.allclose(perturbation_map(x, x + 3 * EPS, EPS), torch.ones_like(zero))


def test_perturbation_map_gray_weights() -> None:
    x = torch.full((1, 3, 4, 4), 0.5)
    for channel, weight in enumerate((0.299, 0.587, 0.114)):
        p = x.clone()
        p[:, channel] += EPS
        out = perturbation_map(x, p, EPS)
        # that channel maps to 1, the others to 0.5
        assert torch.allclose(out, torch.full_like(out, weight + 0.5 * (1 - weight)), atol=1e-5)


def test_perturbation_map_grayscale_passes_through() -> None:
    x = torch.full((1, 1, 4, 4), 0.5)
    p = x.clone()
    p[..., 0, 0] += EPS / 2
    out = perturbation_map(x, p, EPS)
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.75, abs=1e-5)
    assert out[0, 0, 1, 1].item() == pytest.approx(0.5)


def test_perturbation_map_bad_inputs() -> None:
    x = _rand((1, 3, 4, 4))
    with pytest.raises(ConfigError):
        perturbation_map(x, x[:, :1], EPS)
    with pytest.raises(ConfigError):
        perturbation_map(x, x, 0)
    with pytest.raises(ConfigError):
        perturbation_map(_rand((1, 2, 4, 4)), _rand((1, 2, 4, 4)), EPS)


# -- figure -----------------------------------------------------------------------------------------------


def test_save_perturbation_figure(tmp_path: Path) -> None:
    x = _rand((10, 3, 32, 32)) * 0.5 + 0.25
    protected = x.clone()
    protected[:, :, :16] += EPS  # top half perturbed by +eps, bottom half unchanged
    path = tmp_path / "figs" / "maps.png"
    assert save_perturbation_figure(path, x, protected, EPS, max_images=4, scale=4) == path
    assert [p.name for p in path.parent.iterdir()] == ["maps.png"]  # no temporary file left
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (4 * 128 + 5 * 2, 3 * 128 + 4 * 2)
        arr = np.asarray(img)
    # first original, upscaled 4x (nearest neighbour), after the 2-pixel frame
    expected = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(arr[2:130:4, 2:130:4], expected)
    # third row: white (1.0) where +eps, mid gray (0.5) where unchanged
    row3 = arr[2 + 2 * 130 : 2 + 2 * 130 + 128, 2:130]
    assert (row3[:64] == 255).all()
    assert (row3[64:] == 128).all()


def test_save_perturbation_figure_grayscale_and_scale_one(tmp_path: Path) -> None:
    x = _rand((2, 1, 20, 24))
    path = save_perturbation_figure(tmp_path / "g.png", x, x, EPS, scale=1, gap=0)
    with Image.open(path) as img:
        assert img.size == (2 * 24, 3 * 20) and img.mode == "RGB"


def test_save_perturbation_figure_errors(tmp_path: Path) -> None:
    x = _rand((2, 3, 8, 8))
    with pytest.raises(ConfigError):
        save_perturbation_figure(tmp_path / "a.png", x, x, EPS, scale=0)
    with pytest.raises(ConfigError):
        save_perturbation_figure(tmp_path / "a.png", x[:0], x[:0], EPS)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ImageWriteError):
        save_perturbation_figure(blocker / "a.png", x, x, EPS)
