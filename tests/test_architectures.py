"""Architectures: every registered builder runs, and the CIFAR ResNets match the shared weight files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import randomized_batchnorm
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


@pytest.mark.parametrize("mode", ["pad_both", "pad_end"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_pad_shortcut_gradient_is_autograds_in_the_inputs_layout(mode, memory_format) -> None:
    """The shortcut's own backward gives the gradient autograd gives through slice and pad, bit for bit, but in
    the input's layout (autograd's is NCHW), and a traced net holds the shortcut as one node."""
    shortcut = PadShortcut(16, 32, stride=2, mode=mode)
    x = torch.rand(3, 16, 8, 8).contiguous(memory_format=memory_format).requires_grad_(True)
    upstream = torch.randn(3, 32, 4, 4)
    (grad,) = torch.autograd.grad(shortcut(x), x, upstream)
    plain = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *shortcut.pad))
    (want,) = torch.autograd.grad(plain, x, upstream)
    assert torch.equal(grad, want)
    assert grad.is_contiguous(memory_format=memory_format)
    assert torch.equal(shortcut(x), plain)
    traced = torch.fx.symbolic_trace(create_arch("cifar_resnet20").eval())
    assert [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function" and "pad" in str(n.target)] \
        == ["pad_shortcut", "pad_shortcut"]  # fmt: skip


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
        ("dm_wide_resnet", {"depth": 27}),
        ("dm_preact_resnet18", {"activation": "tanh"}),
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


def test_resize_matrix_is_read_off_in_blocks_with_the_same_bits(monkeypatch) -> None:
    """The resize matrix was read off the whole identity of the input's side at once: 12.8 GB for a
    40000-pixel panorama, and no run at all for a 100000x20 strip. Read a block of rows at a time, it
    holds the same bits (each row is an image of the batch, resized alone)."""
    from preempt_cli.models import _load

    whole = _load._resize_matrix(700, 32, torch.device("cpu"))
    _load._resize_matrix.cache_clear()
    monkeypatch.setattr(_load, "_RESIZE_MATRIX_ELEMENTS", 2 * 700 * 9)  # blocks of 9 rows, the last of 7
    try:
        blocks = _load._resize_matrix(700, 32, torch.device("cpu"))
    finally:
        _load._resize_matrix.cache_clear()
    assert blocks.shape == (32, 700) and torch.equal(blocks, whole)


def test_the_resize_matrix_is_read_off_on_the_cpu_for_any_device(monkeypatch) -> None:
    """The CUDA kernel refuses the scales of a big photo into a 32x32 model (too much shared memory): the
    matrix is read off on the CPU, then moved to the device."""
    from preempt_cli.models import _load

    seen, interpolate = set(), F.interpolate

    def recording(x, *args, **kw):
        seen.add(x.device.type)
        return interpolate(x, *args, **kw)

    monkeypatch.setattr(_load.F, "interpolate", recording)
    _load._resize_matrix.cache_clear()
    try:
        matrix = _load._resize_matrix(300, 8, torch.device("meta"))
    finally:
        _load._resize_matrix.cache_clear()
    assert seen == {"cpu"} and matrix.device.type == "meta" and matrix.shape == (8, 300)


def test_a_very_long_side_is_resized_by_interpolate_itself(monkeypatch) -> None:
    """Beyond ``_RESIZE_MATRIX_MAX_SIDE`` (a panorama, a strip) the matrices would cost the side squared:
    ``resize`` calls the direct kernel, which is the same function."""
    from preempt_cli.models import _load

    monkeypatch.setattr(_load, "_RESIZE_MATRIX_MAX_SIDE", 600)
    monkeypatch.setattr(_load, "_resize_matrix", lambda *a: pytest.fail("matrix built for a side over the limit"))
    x = torch.rand(1, 3, 20, 700, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(_load.resize(x, (32, 32)), ref)


# -- DeepMind nets as RobustBench builds them (DMWideResNet, DMPreActResNet) ------------------------------------------
# The expected keys and shapes below are read off robustbench/model_zoo/architectures/dm_wide_resnet.py, so that a
# converted RobustBench checkpoint (Bartoldson2024Adversarial_WRN-94-16, Gowal2021Improving_R18_ddpm_100m) loads
# with strict=True.

_BN = ("weight", "bias", "running_mean", "running_var")


def _bn(prefix: str, chs: int) -> dict[str, tuple[int, ...]]:
    return {**{f"{prefix}.{k}": (chs,) for k in _BN}, f"{prefix}.num_batches_tracked": ()}


def _dm_wrn_10_1_keys() -> dict[str, tuple[int, ...]]:
    """DMWideResNet(depth=10, width=1): one block per group; widths 16, 16, 32, 64 (the first block keeps its width:
    no shortcut)."""
    keys = {"mean": (3, 1, 1), "std": (3, 1, 1), "init_conv.weight": (16, 3, 3, 3)}
    for g, (cin, cout) in enumerate([(16, 16), (16, 32), (32, 64)]):
        p = f"layer.{g}.block.0"
        keys |= _bn(f"{p}.batchnorm_0", cin) | {f"{p}.conv_0.weight": (cout, cin, 3, 3)}
        keys |= _bn(f"{p}.batchnorm_1", cout) | {f"{p}.conv_1.weight": (cout, cout, 3, 3)}
        if cin != cout:
            keys[f"{p}.shortcut.weight"] = (cout, cin, 1, 1)
    return keys | _bn("batchnorm", 64) | {"logits.weight": (10, 64), "logits.bias": (10,)}


def test_dm_wide_resnet_keys_and_shapes_are_robustbench_s() -> None:
    net = create_arch("dm_wide_resnet", depth=10, width=1)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == _dm_wrn_10_1_keys()
    deeper = create_arch("dm_wide_resnet", depth=16, width=2)  # two blocks per group; the second never projects
    keys = set(deeper.state_dict())
    assert "layer.0.block.0.shortcut.weight" in keys and "layer.0.block.1.shortcut.weight" not in keys
    assert tuple(deeper.state_dict()["layer.2.block.1.conv_1.weight"].shape) == (128, 128, 3, 3)
    # the paper's WRN-94-16: 15 blocks per group, 1024 features (on meta: no memory)
    with torch.device("meta"):
        big = create_arch("dm_wide_resnet", depth=94, width=16)
    shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    assert "layer.2.block.14.conv_1.weight" in shapes and "layer.2.block.15.conv_1.weight" not in shapes
    assert shapes["logits.weight"] == (10, 1024) and shapes["layer.0.block.0.shortcut.weight"] == (256, 16, 1, 1)


def test_dm_preact_resnet18_keys_and_shapes_are_robustbench_s() -> None:
    with torch.device("meta"):
        net = create_arch("dm_preact_resnet18")
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {"mean": (3, 1, 1), "std": (3, 1, 1), "conv_2d.weight": (64, 3, 3, 3)}
    cin = 64
    for s, cout in enumerate((64, 128, 256, 512)):
        for i in range(2):
            p = f"layer_{s}.{i}"
            c_in = cin if i == 0 else cout
            expected |= _bn(f"{p}.batchnorm_0", c_in) | {f"{p}.conv_2d_1.weight": (cout, c_in, 3, 3)}
            expected |= _bn(f"{p}.batchnorm_1", cout) | {f"{p}.conv_2d_2.weight": (cout, cout, 3, 3)}
            if i == 0 and s > 0:
                expected[f"{p}.shortcut.weight"] = (cout, c_in, 3, 3)  # a 3x3 projection, not 1x1
        cin = cout
    expected |= _bn("batchnorm", 512) | {"logits.weight": (10, 512), "logits.bias": (10,)}
    assert got == expected


def _reference_dm_wrn_10_1(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DMWideResNet's forward written out with functional ops, from the reference's definition."""

    def bn(p, t):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])

    out = F.conv2d((x - sd["mean"]) / sd["std"], sd["init_conv.weight"], padding=1)
    for g, stride in enumerate((1, 2, 2)):
        p = f"layer.{g}.block.0"
        pre = F.silu(bn(f"{p}.batchnorm_0", out))
        padded = F.pad(pre, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))  # TensorFlow SAME
        h = F.conv2d(padded, sd[f"{p}.conv_0.weight"], stride=stride)
        h = F.conv2d(F.silu(bn(f"{p}.batchnorm_1", h)), sd[f"{p}.conv_1.weight"], padding=1)
        short = F.conv2d(pre, sd[f"{p}.shortcut.weight"], stride=stride) if f"{p}.shortcut.weight" in sd else out
        out = short + h
    out = F.avg_pool2d(F.silu(bn("batchnorm", out)), 8).flatten(1)
    return F.linear(out, sd["logits.weight"], sd["logits.bias"])


def test_dm_wide_resnet_computes_the_reference_function() -> None:
    net = randomized_batchnorm(create_arch("dm_wide_resnet", depth=10, width=1))
    sd = net.state_dict()
    net.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)  # a checkpoint with these keys loads
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(out, _reference_dm_wrn_10_1(sd, x), atol=1e-4, rtol=1e-4)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert all(isinstance(m, torch.nn.SiLU) for n, m in net.named_modules() if n.endswith(("relu_0", "relu_1")))
    # the normalization is the net's own, from its buffers (a checkpoint's values are used)
    with torch.no_grad():
        net.mean.zero_()
        net.std.fill_(1.0)
        assert not torch.allclose(net(x), out)


def test_dm_preact_resnet18_shortcut_takes_the_raw_padded_input() -> None:
    from preempt_cli.models.dm_resnet import DMPreActBlock

    block = randomized_batchnorm(DMPreActBlock(4, 8, stride=2, act=torch.nn.SiLU))
    sd = block.state_dict()
    x = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def bn(p, t):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])

    pre = F.silu(bn("batchnorm_0", x))
    h = F.conv2d(F.pad(pre, (0, 1, 0, 1)), sd["conv_2d_1.weight"], stride=2)
    h = F.conv2d(F.silu(bn("batchnorm_1", h)), sd["conv_2d_2.weight"], padding=1)
    expected = h + F.conv2d(F.pad(x, (0, 1, 0, 1)), sd["shortcut.weight"], stride=2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_dm_preact_resnet18_forward_and_fusing() -> None:
    from preempt_cli.models._fusion import fuse_conv_bn

    torch.manual_seed(0)
    net = randomized_batchnorm(create_arch("dm_preact_resnet18", num_classes=10))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        torch.testing.assert_close(fuse_conv_bn(copy.deepcopy(net))(x), out, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("kwargs", "message"), [({"depth": 27}, "6n\\+4"), ({"activation": "gelu"}, "activation"),
                                                 ({"mean": (0.5,), "std": (0.5, 0.5)}, "one value per")])  # fmt: skip
def test_dm_wide_resnet_invalid_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_arch("dm_wide_resnet", **kwargs)


@pytest.mark.parametrize("name", ["wrn-94-16", "preact18"])
def test_paper_rows_build_robustbench_s_nets(name: str, isolated_config) -> None:
    from preempt_cli.registry import get_model_config

    cfg = get_model_config(name)
    assert cfg.mean is None and cfg.std is None  # normalized inside the net: never twice
    with torch.device("meta"):
        net = create_arch(cfg.arch, num_classes=cfg.num_classes, **cfg.arch_args)
    assert net.mean.shape == (3, 1, 1) and "mean" in net.state_dict()
    assert all(isinstance(m, torch.nn.SiLU) for n, m in net.named_modules() if n.endswith(("relu_0", "relu_1")))
    # RobustBench's CIFAR10_MEAN / CIFAR10_STD, which the weights file's buffers hold too
    assert cfg.arch_args["mean"] == [0.4914, 0.4822, 0.4465] and cfg.arch_args["std"] == [0.2471, 0.2435, 0.2616]
    keys = set(net.state_dict())
    if name == "wrn-94-16":
        assert (cfg.arch, cfg.arch_args["depth"], cfg.arch_args["width"]) == ("dm_wide_resnet", 94, 16)
        assert "layer.2.block.14.conv_1.weight" in keys and net.logits.in_features == 1024
    else:
        assert cfg.arch == "dm_preact_resnet18" and "layer_3.1.conv_2d_2.weight" in keys
