"""Convolutions fused with their ReLU (``models._fusion``): the same logits and input gradients, bit for bit,
as the net with only its BatchNorm folded; the fused path where it applies and the plain one elsewhere."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomized_batchnorm
from preempt_cli import FastPreemption, ForeBackConfig, load_model
from preempt_cli.models import create_arch
from preempt_cli.models._fusion import ConvReLU2d, fuse_conv_bn, fuse_conv_relu, fuse_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _logits_and_input_grad(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs = x.clone().requires_grad_(True)
    logits = net(xs)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xs)
    return logits.detach(), grad


def _fused_pair(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(BatchNorm folded only, folded and fused), both frozen and channels-last, as load_model gives them."""
    pair = []
    for fuse in (fuse_conv_bn, fuse_model):
        model = fuse(copy.deepcopy(net)).to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        pair.append(model)
    return pair[0], pair[1]


@pytest.fixture(scope="module")
def resnet20_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return _fused_pair(randomized_batchnorm(create_arch("cifar_resnet20", num_classes=10)))


def test_resnet20_every_relu_is_fused_and_the_state_dict_is_unchanged(resnet20_pair) -> None:
    folded, fused = resnet20_pair
    # 19 ReLUs: the stem's, and two per block (9 blocks), the second after the residual addition
    kinds = [m for m in fused.modules() if isinstance(m, ConvReLU2d)]
    assert len(kinds) == 19
    code = fused.code
    assert "relu" not in code and " + " not in code, code
    assert list(fused.state_dict()) == list(folded.state_dict())
    for key, value in folded.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)


@pytest.mark.parametrize("batch", [1, 2, 40])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_resnet20_logits_and_input_gradients_equal_bit_for_bit(resnet20_pair, batch, memory_format) -> None:
    folded, fused = resnet20_pair
    gen = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, 32, 32, generator=gen).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), generator=gen)
    logits, grad = _logits_and_input_grad(fused, x, y)
    want_logits, want_grad = _logits_and_input_grad(folded, x, y)
    assert torch.equal(logits, want_logits)
    assert torch.equal(grad, want_grad)
    assert grad.abs().sum() > 0


def test_fused_path_is_taken_on_cpu_and_the_plain_one_elsewhere(resnet20_pair, monkeypatch) -> None:
    """The oneDNN kernel runs for float32 gradients on a CPU; bf16 autocast, float64, a strided view and a
    batch PyTorch runs without oneDNN take the separate operations, with the unfused net's results."""
    folded, fused = resnet20_pair
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append("relu")
            return real(*args)

        def binary(self, *args):
            calls.append("add+relu")
            return real.binary(*args)

    import preempt_cli.models._fusion as fusion

    monkeypatch.setattr(fusion.torch.ops.mkldnn, "_convolution_pointwise", Spy())
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(8, dtype=torch.long)
    _logits_and_input_grad(fused, x, y)
    assert calls.count("relu") == 10 and calls.count("add+relu") == 9
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(fused(x), folded(x))
    one = x[:1]  # PyTorch's own convolution takes its Slow2d kernel here; so does the fused net
    assert torch.equal(_logits_and_input_grad(fused, one, y[:1])[1], _logits_and_input_grad(folded, one, y[:1])[1])
    assert calls == []
    double = copy.deepcopy(fused).double()
    assert torch.equal(double(x.double()), copy.deepcopy(folded).double()(x.double()))
    assert calls == []
    strided = x.transpose(2, 3)  # dense in neither layout: the stem's convolution goes the plain way, the rest fuse
    assert torch.equal(_logits_and_input_grad(fused, strided, y)[1], _logits_and_input_grad(folded, strided, y)[1])
    assert calls.count("relu") == 9 and calls.count("add+relu") == 9


def test_weight_gradients_match_the_unfused_net() -> None:
    """Not what the engine needs (its parameters are frozen), but a ConvReLU2d is a Conv2d: training it works."""
    torch.manual_seed(1)
    net = randomized_batchnorm(create_arch("cifar_resnet20", num_classes=10))
    folded, fused = (f(copy.deepcopy(net)) for f in (fuse_conv_bn, fuse_model))
    x = torch.rand(6, 3, 32, 32)
    y = torch.arange(6)
    grads = []
    for model in (folded, fused):
        for p in model.parameters():  # the folded biases too, which fx's fusing creates without
            p.requires_grad_(True)
        loss = F.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Patterns(nn.Module):
    """What fx graphs of other nets hold: ReLU modules (in place too), the residual on either side, a method
    call; and what must not be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)  # called twice: left alone
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")  # left alone
        self.kept = nn.Conv2d(8, 8, 3, padding=1)  # its output is used twice: left alone
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        h = F.relu(h + self.b(h))  # residual on the left
        h = (self.c(h) + h).relu()  # a method call
        h = torch.relu(self.shared(h))
        h = F.relu(self.shared(h))
        h = F.relu(self.reflect(h))
        k = self.kept(h)
        h = F.relu(k) + k
        return self.fc(h.mean(dim=(2, 3)))


def test_patterns_fused_and_left_alone() -> None:
    torch.manual_seed(2)
    net = _Patterns().eval()
    traced = torch.fx.symbolic_trace(copy.deepcopy(net))
    fused = fuse_conv_relu(traced)
    assert sorted(name for name, m in fused.named_modules() if isinstance(m, ConvReLU2d)) == ["a", "b", "c"]
    assert type(fused.shared) is nn.Conv2d and type(fused.reflect) is nn.Conv2d and type(fused.kept) is nn.Conv2d
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.rand(4, 3, 16, 16).contiguous(memory_format=memory_format)
        y = torch.arange(4)
        got, want = _logits_and_input_grad(fused, x, y), _logits_and_input_grad(net, x, y)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


class _SelfAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return F.relu(h + h)  # the convolution would be its own residual


class _InPlaceBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        h = self.conv(x)
        t = self.act(x)  # changes the convolution's input before the addition: the convolution cannot move down
        return F.relu(h + t)


class _InPlaceFunctionBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        h = self.conv(x)
        t = F.hardtanh(x, -0.5, 0.5, True)  # another in-place function (fx records its flag by keyword)
        return F.relu(h + t)


@pytest.mark.parametrize("net_class", [_SelfAdd, _InPlaceBetween, _InPlaceFunctionBetween])
def test_patterns_whose_fusing_would_change_the_result_are_left_alone(net_class) -> None:
    torch.manual_seed(3)
    net = net_class().eval()
    fused = fuse_conv_relu(torch.fx.symbolic_trace(copy.deepcopy(net)))
    assert not any(isinstance(m, ConvReLU2d) for m in fused.modules())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))


def test_untraceable_net_is_returned_unfused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.relu(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    net = Branchy()
    assert fuse_model(net) is net


def test_real_backbone_engine_gives_the_unfused_engines_bits(shared_models_dir, cifar_batch) -> None:
    """``load_model`` fuses; the engine's protected images are those of the BatchNorm-folded net (0.14.0's)."""
    x, y = (t.cpu() for t in cifar_batch)
    fused = load_model("cifar10-resnet20-pgdat-a", models_dir=shared_models_dir)
    folded = load_model("cifar10-resnet20-pgdat-a", models_dir=shared_models_dir, fuse=False)
    folded.net = fuse_conv_bn(folded.net)
    folded = folded.to(memory_format=torch.channels_last)
    assert sum(isinstance(m, ConvReLU2d) for m in fused.modules()) == 19
    assert not any(isinstance(m, ConvReLU2d) for m in folded.modules())
    config = ForeBackConfig.from_preset("paper", dataset="cifar10")
    out = FastPreemption(fused, config=config, seed=3).perturb(x, y)
    want = FastPreemption(folded, config=config, seed=3).perturb(x, y)
    assert torch.equal(out, want)
    assert not torch.equal(out, x)


# -- the allocator ---------------------------------------------------------------------------------------------

_FAULTS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from preempt_cli.device import tune_malloc
    tuned = tune_malloc()
    assert tune_malloc() is tuned  # the first call decides
    def churn():  # a pass's activations: held together, then freed together
        for _ in range(3):
            held = [torch.empty(16 << 20 >> 2).fill_(1.0) for _ in range(8)]  # 8 x 16 MiB
            del held
    def work():  # in a thread of its own, as Protector.run computes: warm up, then count each of 3 churns
        for _ in range(3):
            churn()
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            churn()
            counted.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    import threading
    counted = []
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(tuned, min(counted))  # the heap settles; a block may first land beyond its end
    """
)


def _faults(**env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PREEMPT_TUNE_MALLOC"}
    environ.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env={**environ, **env}, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
def test_tune_malloc_keeps_freed_blocks_and_respects_the_users_choice() -> None:
    # 3 x 8 blocks of 16 MiB = 4096 pages each: kept, no page is touched for the first time again
    tuned, faults = _faults()
    assert tuned and faults < 500, faults
    # a user's own setting (here: give back all but 128 KiB) is left alone, and with it every page faults again
    tuned, faults = _faults(MALLOC_TRIM_THRESHOLD_="131072")
    assert not tuned and faults > 8 * 4096, faults
    assert _faults(PREEMPT_TUNE_MALLOC="0")[0] is False
    assert _faults(MALLOC_MMAP_MAX_="0")[0] is False  # any MALLOC_* variable
    assert _faults(GLIBC_TUNABLES="glibc.malloc.arena_max=4")[0] is False


def test_compiling_a_fused_net_traces_it_whole(resnet20_pair) -> None:
    """Under torch.compile a ConvReLU2d is the plain convolution, addition and ReLU, decided before anything
    that would break the graph; the CIFAR ResNet's shortcut with its own backward traces too."""
    _, fused = resnet20_pair
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    explanation = torch._dynamo.explain(fused)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()


# -- BatchNorm folding: every architecture, and what must not be folded ----------------------------------------


def _wild_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` in eval mode with BatchNorm layers far from their initial state: means around 2, variances from
    0.05 to 20, affine weights of either sign, eps 1e-3; every third layer without affine parameters, every
    fifth without running statistics (it normalizes by the batch's, and must not be folded)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [(name, m) for name, m in net.named_modules() if type(m) is nn.BatchNorm2d]
    for i, (name, bn) in enumerate(norms):
        if i % 5 == 4 or i % 3 == 2:
            bn = nn.BatchNorm2d(bn.num_features, affine=i % 3 != 2, track_running_stats=i % 5 != 4, momentum=None)
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, bn)
        bn.eps = 1e-3
        with torch.no_grad():
            if bn.track_running_stats:
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 3 + 2)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 20 + 0.05)
            if bn.affine:
                bn.weight.copy_(torch.randn(bn.num_features, generator=gen) * 1.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    return net.eval()


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("cifar_resnet20", {"shortcut": "pad_end"}),
        ("resnet18_cifar", {}),
        ("preact_resnet18", {"preact_shortcut": False}),
        ("wide_resnet", {"depth": 10, "widen_factor": 1}),
        ("resnext29_32x4d", {"cardinality": 2, "base_width": 4}),
        ("dm_wide_resnet", {"depth": 10, "width": 1, "activation": "relu"}),
        ("dm_preact_resnet18", {}),
    ],
)
def test_every_architecture_fused_computes_the_unfused_function(arch, kwargs) -> None:
    """In float64, where rounding (about 1e-16 a step) is far below any error of the folding itself (a wrong
    eps, sign or channel moves the logits by 1e-3 or more) and no ReLU flips its mask on a last bit: logits and
    input gradients within 1e-10 of their largest value. The caller's net, its mode and its parameters stay as
    they were; the fused net has parameters of its own, in eval mode, of the net's dtype."""
    torch.manual_seed(4)
    net = _wild_batchnorm(create_arch(arch, num_classes=10, **kwargs)).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()  # fused for inference whatever the caller's mode, which stays
    fused = fuse_model(net)
    assert net.training and not fused.training
    net.eval()
    batch_normalizing = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and not m.track_running_stats]
    assert batch_normalizing and len(batch_normalizing) == sum(
        isinstance(m, nn.BatchNorm2d) and not m.track_running_stats for m in fused.modules())
    storages = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    assert not any(t.untyped_storage().data_ptr() in storages for t in [*fused.parameters(), *fused.buffers()])
    assert {p.dtype for p in fused.parameters()} == {torch.float64}
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=gen)
    got, want = _logits_and_input_grad(fused, x, y), _logits_and_input_grad(net, x, y)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-10 * w.abs().max(), (g - w).abs().max() / w.abs().max()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


class _ConvCalledTwice(nn.Module):
    def __init__(self, second_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4) if second_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(F.relu(self.bn1(self.conv(x)))))  # folding bn1 would change the second call too


class _ConvWeightReadElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.bn(self.conv(x)), self.conv.weight, padding=1)  # tied: reads the unfolded weight


class _LinearNormOfAnotherDimension(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.mean(dim=3)))  # [N, 4, 4]: the Linear maps the last dimension, the norm dim 1


@pytest.mark.parametrize("make_net", [lambda: _ConvCalledTwice(True), lambda: _ConvCalledTwice(False),
                                      _ConvWeightReadElsewhere, _LinearNormOfAnotherDimension])  # fmt: skip
def test_batchnorm_that_folding_would_get_wrong_is_left_alone(make_net) -> None:
    torch.manual_seed(6)
    net = _wild_batchnorm(make_net())
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm1d)):
        with torch.no_grad():
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.1, 5)
    fused = fuse_model(copy.deepcopy(net))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))


def test_a_number_added_before_the_relu_goes_the_plain_way() -> None:
    class AddsAChannelCount(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv(x) + x.size(1))  # traced: an addition of the convolution and an int node

    net = AddsAChannelCount().eval()
    fused = fuse_model(copy.deepcopy(net))
    assert isinstance(fused.conv, ConvReLU2d)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(fused(x), net(x))


def test_real_weights_fused_keep_every_prediction(shared_models_dir, cifar_test_dir) -> None:
    """100 real test images: the same top-1 class from the fused net as from the unfused one, and logits within
    1e-5 of their largest (float32 rounds each of ~20 layers to ~6e-8: folding moves logits by ~4e-7 of it)."""
    from conftest import cifar_test_files, load_cifar_images

    files = cifar_test_files(cifar_test_dir)[:100]
    x = load_cifar_images([path for path, _ in files])
    for name in ("cifar10-resnet20-pgdat-a", "cifar10-resnet20-std"):
        fused = load_model(name, models_dir=shared_models_dir)
        plain = load_model(name, models_dir=shared_models_dir, fuse=False)
        assert not any(p.requires_grad for p in fused.parameters())
        with torch.no_grad():
            got, want = fused(x), plain(x)
        assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
