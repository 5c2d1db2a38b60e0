"""The Python API as a caller uses it: ``Protector.protect`` on tensors, its input checks, the settings'
checks, and what the package exports."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import preempt_cli
from conftest import (TEST_DEVICE, CudaLikeDivision, LiveBuffers, interrupt_run_once, make_tiny_model, tiny_config,
                      write_random_pngs)
from preempt_cli import FastPreemption, ForeBackConfig, Protector, RunOptions, collect_inputs, parse_eps, read_image
from preempt_cli.engine import content_seeds
from preempt_cli.errors import ConfigError, InputError
from preempt_cli import engine as engine_module
from preempt_cli import protect as protect_module
from preempt_cli.imageio import content_seed, levels_to_float, quantize, quantize_batch, stack_levels
from preempt_cli.protect import read_preempt_metadata

FAST = ForeBackConfig(samples=3)  # few samples: these tests check bits and errors, not protection


@pytest.fixture
def protector(tiny_backbone) -> Protector:
    return Protector(tiny_backbone, config=FAST, seed=5)


@pytest.fixture
def images() -> torch.Tensor:
    """8 CIFAR-size 8-bit images as [0, 1] floats (what a decoded file gives)."""
    levels = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return (levels.float() / 255).to(TEST_DEVICE)


# -- each image's noise comes from its own pixels, never its place in a batch ---------------------------------
def test_protect_gives_an_image_the_same_bits_in_any_batch(protector, images) -> None:
    batch = protector.protect(images)
    one_by_one = torch.cat([protector.protect(images[i : i + 1]) for i in range(len(images))])
    assert torch.equal(batch, one_by_one)
    order = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    assert torch.equal(protector.protect(images[order]), batch[order])
    twice = protector.protect(images[[3, 3]])
    assert torch.equal(twice[0], twice[1]) and torch.equal(twice[0], batch[3])


def test_a_photo_is_rounded_to_levels_without_its_float_copy(protector, monkeypatch) -> None:
    """The pipeline decodes a photo's levels into floats to protect them, then rounds the protected floats back
    to levels: it held the floats while rounding (12 bytes a pixel), which needs only the protected ones."""
    color = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    levels = stack_levels([color], TEST_DEVICE)
    live_when_rounding: list[int] = []
    rounding = protect_module.quantize_batch_on_device

    def counted(*args, **kwargs):
        live_when_rounding.append(live.count())
        return rounding(*args, **kwargs)

    monkeypatch.setattr(protect_module, "quantize_batch_on_device", counted)
    with LiveBuffers(levels.numel() * 4) as live:  # buffers of the photo's size in float32
        stats, saved = protector._device_work(levels, None, 255,
                                              lambda lv, y: protector.transform_levels(lv, 255, y, noise_seeds=[1]))
    assert live_when_rounding == [1]  # the protected floats alone
    assert saved.shape == (1, 120, 160, 3) and (saved.cpu().numpy().astype(int) - color).max() <= 8


def test_the_pipeline_protects_a_photo_with_four_buffers_of_its_size_at_most(protector, tmp_path,
                                                                             monkeypatch) -> None:  # fmt: skip
    """The pipeline held a photo's floats (made from its levels, for its label and confidence) while the engine
    protected them, and the engine held them as the center of the budget through every step: 5 float32 buffers
    of the photo's size at once (the floats, the iterate, the samples' sum, a sample and its gradient). The
    engine now makes them from the levels itself, frees them after the first step, and computes the budget from
    the levels: 4, and the bits of the tensor API."""
    from preempt_cli.protect import _Pending

    path = write_random_pngs(tmp_path, n=1, size=(160, 120))[0]
    [item] = collect_inputs([path])
    picture = read_image(path)
    numel = picture.color.size
    # one sample per pass, and its budget in blocks of a tenth of it, as a 12-megapixel photo goes
    monkeypatch.setitem(engine_module.SAMPLE_CHUNK_ELEMENTS, TEST_DEVICE.type, numel)
    monkeypatch.setitem(engine_module.BOUND_BLOCK_ELEMENTS, TEST_DEVICE.type, numel // 10)
    with LiveBuffers(numel * 4) as live:
        [(levels, _, _, label)] = protector._compute([_Pending(item, tmp_path / "out.png", picture)]).results()
    assert live.peak <= 4
    x = levels_to_float(stack_levels([picture.color], TEST_DEVICE), 255)
    protected = protector.transform(x, torch.tensor([label], device=TEST_DEVICE), noise_seeds=[picture.content_seed])
    assert label == int(protector.predict(x)[0])
    assert np.array_equal(levels, quantize_batch(protected, [picture.color], protector.config.eps)[0][0])
    assert not np.array_equal(levels, picture.color)


def test_engine_defaults_to_content_seeds(tiny_backbone, images) -> None:
    y = torch.arange(len(images), device=TEST_DEVICE) % 10
    engine = FastPreemption(tiny_backbone, config=FAST, seed=2)
    hwc = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    explicit = engine.perturb(images, y, noise_seeds=[content_seed(a) for a in hwc])
    assert torch.equal(engine.perturb(images, y), explicit)
    assert torch.equal(engine.perturb(images.flip(0), y.flip(0)), explicit.flip(0))


def test_content_seeds_read_8_bit_16_bit_and_other_values() -> None:
    levels8 = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    levels16 = np.random.default_rng(1).integers(0, 65536, (2, 5, 4, 3), dtype=np.uint16)
    as_float = lambda a, m: torch.from_numpy(a.astype(np.int64)).permute(0, 3, 1, 2).float() / m  # noqa: E731
    assert content_seeds(as_float(levels8, 255)) == [content_seed(a) for a in levels8]
    assert content_seeds(as_float(levels16, 65535)) == [content_seed(a) for a in levels16]
    other = torch.full((1, 3, 5, 4), 0.1234)
    assert content_seeds(other) == [content_seed(np.full((5, 4, 3), 0.1234, dtype=np.float32))]


def test_content_seeds_of_a_mixed_batch_are_each_image_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The levels of a batch are read at once, on its device, and in parts of
    ``CONTENT_SEED_CHUNK_ELEMENTS``: 8-bit, 16-bit and other images mixed in one batch (a NaN, a repeated
    image, float64) each get the seed they get alone, in any part."""
    from preempt_cli import engine

    rng = np.random.default_rng(2)
    levels8 = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    levels16 = rng.integers(0, 65536, (3, 6, 5, 3), dtype=np.uint16)
    other = rng.random((2, 6, 5, 3), dtype=np.float32)
    other[1, 0, 0, 0] = np.nan
    expected = [content_seed(a) for a in (*levels8, *levels16, *other, levels8[0])]
    as_float = lambda a, m: torch.from_numpy(a.astype(np.float64) / m).permute(0, 3, 1, 2).float()  # noqa: E731
    x = torch.cat([as_float(levels8, 255), as_float(levels16, 65535), as_float(other, 1), as_float(levels8[:1], 255)])
    order = torch.from_numpy(rng.permutation(len(x)))
    x, expected = x[order].to(TEST_DEVICE), [expected[i] for i in order.tolist()]
    assert content_seeds(x) == expected
    assert content_seeds(x.double()) == expected
    assert content_seeds(x[:0]) == []
    monkeypatch.setattr(engine, "CONTENT_SEED_CHUNK_ELEMENTS", 200)  # parts of 2 images, and of 1
    assert content_seeds(x) == expected
    monkeypatch.setattr(engine, "CONTENT_SEED_CHUNK_ELEMENTS", 1)
    assert content_seeds(x) == expected


def test_content_seeds_read_a_decoded_file_s_levels_as_cuda_divides() -> None:
    """A tensor decoded on the host (``Picture.to_tensor``: levels / 255 divided exactly) and sent to a GPU
    gets its file's seed there too. The levels were checked with ``levels / 255`` on the tensor's device,
    where CUDA multiplies by the reciprocal: half the levels were a bit off, and the image got the seed of
    its float bytes, other noise on a GPU than on the CPU (emulated here on the CPU)."""
    levels8 = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256  # every level
    levels16 = np.random.default_rng(3).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
    x8 = torch.from_numpy(levels8).permute(2, 0, 1).float().div(255)[None]  # exactly divided, as decoded
    x16 = torch.from_numpy(levels16.astype(np.int64)).permute(2, 0, 1).float().div(65535)[None]
    with CudaLikeDivision():
        as_cuda_divides = torch.arange(256.0).div(255)
        seeds = content_seeds(torch.cat([x8, x16]))
    assert int(as_cuda_divides.ne(torch.arange(256.0).div(255)).sum()) == 126  # the emulation is CUDA's
    assert seeds == [content_seed(levels8.astype(np.uint8)), content_seed(levels16)]


def test_protecting_a_decoded_file_gives_the_pipelines_bits(tmp_path: Path, tiny_backbone) -> None:
    write_random_pngs(tmp_path / "in", n=3)
    protector = Protector(tiny_backbone, config=FAST, seed=9)
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out")))
    assert [r.status for r in results] == ["done"] * 3
    for result in results:
        picture = read_image(result.input)
        x = picture.to_tensor()[None].to(TEST_DEVICE)
        expected = quantize(protector.protect(x)[0], picture.color, FAST.eps)
        assert np.array_equal(read_image(result.output).color, expected), result.input.name


# -- input checks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x: (x * 255).to(torch.uint8), r"float in \[0, 1\].*x.float\(\) / 255"),
        (lambda x: x * 255, r"\[0, 1\].*x / 255"),
        (lambda x: x - 0.5, r"\[0, 1\]"),
        (lambda x: torch.where(x > 0.5, torch.nan, x), r"\[0, 1\]"),
        (lambda x: torch.where(x > 0.5, torch.inf, x), r"\[0, 1\]"),
        (lambda x: x[0], r"\[B, C, H, W\].*x\[None\]"),
        (lambda x: x.permute(0, 2, 3, 1), "channels.*permute"),
        (lambda x: x.cpu().numpy(), "torch.Tensor"),
        (lambda x: x.tolist(), "torch.Tensor"),
        (lambda x: x[:, :, :0], "height and width"),
    ],
)
def test_protect_refuses_images_it_cannot_protect(protector, images, bad, match) -> None:
    with pytest.raises(InputError, match=match):
        protector.protect(bad(images))


@pytest.mark.parametrize(
    "labels, match",
    [([10], r"\[0, 10\)"), ([-1], r"\[0, 10\)"), (torch.tensor([1.0]), "integer"), ([1, 2], "expected 1 label")],
)
def test_protect_refuses_bad_labels(protector, images, labels, match) -> None:
    y = labels if isinstance(labels, torch.Tensor) else torch.tensor(labels)
    with pytest.raises(InputError, match=match):
        protector.protect(images[:1], y)


def test_the_range_error_tells_normalized_images_from_0_to_255_ones(protector, images) -> None:
    """Mean/std-normalized images reach above 1 as well as below 0 (CIFAR-10's mean and std: about -2 to 2.1):
    they were told to divide by 255, which gave images of about -0.008 to 0.008 and the same error again."""
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=images.device).view(1, 3, 1, 1)
    with pytest.raises(InputError, match="not normalized ones") as caught:
        protector.protect((images - mean) / std)
    assert "x / 255" not in str(caught.value)
    with pytest.raises(InputError, match=r"for 0\.\.255 values use x / 255"):
        protector.protect(images * 255)


def test_a_gray_model_s_channel_error_names_its_one_channel_once() -> None:
    gray = Protector(make_tiny_model(input_size=(1, 32, 32)), labels="backbone", config=FAST)
    with pytest.raises(InputError, match=r"the backbone takes 1$"):
        gray.protect(torch.rand(1, 3, 32, 32))
    with pytest.raises(InputError, match=r"takes 3 \(or 1\)"):
        Protector(make_tiny_model(), labels="backbone", config=FAST).protect(torch.rand(1, 2, 32, 32))


def test_input_errors_are_value_and_type_errors(protector) -> None:
    with pytest.raises(ValueError):
        protector.protect(torch.full((1, 3, 32, 32), 2.0))
    with pytest.raises(TypeError):
        protector.protect(np.zeros((1, 3, 32, 32), np.float32))


def test_empty_batch_gives_an_empty_batch(protector) -> None:
    out = protector.protect(torch.empty(0, 3, 32, 32))
    assert out.shape == (0, 3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_compute_in_float32(protector, images, dtype) -> None:
    x = images.to(dtype)
    out = protector.protect(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, protector.protect(x.float()))


def test_an_input_that_requires_grad_is_protected_without_a_warning(protector, images) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warned of converting a tensor that requires grad to a scalar
        got = protector.protect(images.clone().requires_grad_(True))
    assert torch.equal(got, protector.protect(images))


def test_protect_works_inside_inference_mode(protector, images) -> None:
    expected = protector.protect(images)
    with torch.inference_mode():
        got = protector.protect(images.clone())
    assert torch.equal(got, expected)


class _ParameterFree(torch.nn.Module):
    """A net of one's own without parameters: logits from each channel's mean and its square."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return torch.cat([m, m * m, -m, m.sin()], dim=1)[:, :10]


def test_a_net_without_parameters_is_a_backbone_and_classifier() -> None:
    """README: any nn.Module returning [B, classes] logits, once wrapped in an ImageModel; the Protector took its
    device from its first parameter, and one without any raised a bare StopIteration."""
    from preempt_cli import ImageModel, Reverter

    model = ImageModel(_ParameterFree(), tiny_config("parameter-free", mean=(0.5,) * 3, std=(0.25,) * 3))
    x = torch.rand(2, 3, 32, 32)
    for cls in (Protector, Reverter):
        out = cls(model, model, config=FAST, seed=1).protect(x)
        assert out.shape == x.shape and (out - x).abs().max() <= FAST.eps + 1e-6
    assert torch.equal(Protector(model, config=FAST, seed=1).protect(x),
                       FastPreemption(model, config=FAST, seed=1).perturb(x, model(x).argmax(dim=1)))


@pytest.mark.parametrize("net, says", [
    (lambda: make_tiny_model(num_classes=5).net, "returns 5 logits per image"),
    (lambda: torch.nn.Sequential(make_tiny_model().net, torch.nn.Flatten(0)), r"returns logits of shape \(20,\)"),
], ids=["other-class-count", "not-one-row-per-image"])
def test_a_net_whose_logits_are_not_its_configs_classes_is_a_config_error(net, says) -> None:
    """A net of 5 classes wrapped with a config of 10: its labels were taken for the caller's ("labels must be
    class indices"), or passed unseen; one returning [B * classes] raised IndexError from inside the protector."""
    from preempt_cli import ImageModel

    model = ImageModel(net(), tiny_config("mine"))
    protector = Protector(model, labels="backbone", config=FAST)
    x = torch.rand(2, 3, 32, 32)
    for call in (lambda: protector.protect(x), lambda: protector.predict(x),
                 lambda: protector.confidence(x, torch.tensor([0, 1]))):
        with pytest.raises(ConfigError, match=f"model mine {says}.*num_classes 10"):
            call()


# -- settings -------------------------------------------------------------------------------------------------
def test_protector_refuses_a_model_name(tiny_backbone) -> None:
    with pytest.raises(TypeError, match="load_model"):
        Protector("cifar10-resnet20-pgdat-a")
    with pytest.raises(TypeError, match="load_model"):
        Protector(tiny_backbone, "cifar10-resnet18-std")
    # a bare net has no config (classes, input size): it failed with AttributeError
    with pytest.raises(TypeError, match="loaded model.*Sequential"):
        Protector(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)))
    with pytest.raises(TypeError, match="classifier must be a loaded model"):
        Protector(tiny_backbone, torch.nn.Linear(3072, 10))
    # a loaded model compiled by the caller passes its config through: it is one
    assert Protector(torch.compile(tiny_backbone), labels="backbone").backbone.config is tiny_backbone.config


def test_registry_and_device_given_as_one_string(tmp_path: Path, tiny_backbone) -> None:
    """``load_model(name, registry="reg.toml")`` read the string's characters as files ("r: registry file
    not found"); ``Evaluator(device="cpu")`` failed with AttributeError."""
    from safetensors.torch import save_file

    from preempt_cli.evaluate import Dataset, Evaluator
    from preempt_cli.models import create_arch

    net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "t.safetensors"))
    (tmp_path / "reg.toml").write_text('[models.one-string]\narch = "cifar_resnet20"\narch_args = { shortcut = '
                                       '"pad_end" }\nclasses = "cifar10"\nsource = "file:t.safetensors"\n')  # fmt: skip
    model = preempt_cli.load_model("one-string", registry=str(tmp_path / "reg.toml"))
    assert model.name == "one-string"
    data = Dataset(tmp_path, [], torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    assert Evaluator(data, load=lambda name: tiny_backbone, device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("seed", [1.5, "1", True, -1, 2**64, 2**64 + 1])
def test_protector_refuses_seeds_it_would_not_use_as_given(tiny_backbone, seed) -> None:
    with pytest.raises(ConfigError, match="seed"):
        Protector(tiny_backbone, seed=seed)


def test_protector_takes_any_64_bit_seed(tiny_backbone) -> None:
    assert Protector(tiny_backbone, seed=2**64 - 1).seed == 2**64 - 1
    assert Protector(tiny_backbone, seed=np.int64(3)).seed == 3


def test_load_model_leaves_the_callers_random_numbers_alone() -> None:
    """A net is built with random weights before its file's are loaded over them: those draws advanced the
    caller's global generator, so ``torch.manual_seed(0); load_model(...); torch.rand(...)`` drew other
    numbers than without the load (the attacks and training already kept to their own generators)."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    model = preempt_cli.load_model("preempt-resnet20-at")
    assert torch.equal(torch.rand(4), expected)
    assert model.pin_verified  # the weights are the file's, not the draws'


def test_load_model_on_a_missing_gpu_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        preempt_cli.load_model("preempt-resnet20-at", device="cuda")


def test_config_takes_eps_as_the_cli_does_and_refuses_non_int_counts() -> None:
    assert ForeBackConfig(eps="8/255").eps == 8 / 255
    assert ForeBackConfig(eps="4").eps == 4 / 255
    for bad in (dict(samples=2.5), dict(samples=True), dict(forward_steps=1.0), dict(eps=[8]), dict(eta="0.7")):
        with pytest.raises(ConfigError):
            ForeBackConfig(**bad)
    with pytest.raises(ConfigError, match="unknown setting nope.*samples"):
        ForeBackConfig.from_preset(nope=1)


@pytest.mark.parametrize("text", ["1.5", "8.5", 2.5])
def test_parse_eps_refuses_a_fractional_number_of_levels(text) -> None:
    with pytest.raises(ConfigError, match="whole number of levels"):
        parse_eps(text)


@pytest.mark.parametrize(
    "options",
    [dict(shard=(0, 4)), dict(shard=(5, 4)), dict(shard=(1, 0)), dict(shard=(1,)), dict(partition=(2, 2)),
     dict(max_pixels=0), dict(max_pixels=1.5), dict(suffix="x" * 251), dict(suffix="a\0b"),
     pytest.param(dict(suffix="é" * 126), marks=pytest.mark.skipif(sys.platform != "linux", reason="names in bytes"))],
)  # fmt: skip
def test_run_options_refuse_what_would_process_nothing_or_crash(options) -> None:
    with pytest.raises(ConfigError):
        RunOptions(**options)


def test_run_options_take_every_shard() -> None:
    assert RunOptions(shard=(1, 4)).shard == (1, 4) and RunOptions(shard=(4, 4)).shard == (4, 4)


def test_run_options_take_the_longest_suffix_a_name_can_hold() -> None:
    # a one-letter stem and .png: 255 bytes in all (a longer suffix failed every file, one by one)
    assert RunOptions(suffix="x" * 250).suffix == "x" * 250 and RunOptions(suffix="é" * 125).suffix == "é" * 125


def test_a_preset_config_records_its_preset(tmp_path: Path, tiny_backbone) -> None:
    protector = Protector(tiny_backbone, config=ForeBackConfig.from_preset("paper", samples=2))
    assert protector.run_settings()["preset"] == "paper"
    write_random_pngs(tmp_path / "in", n=1)
    [result] = protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out"))
    assert read_preempt_metadata(read_image(result.output))["preset"] == "paper"
    assert Protector(tiny_backbone, config=ForeBackConfig(samples=2)).run_settings()["preset"] is None
    assert ForeBackConfig.from_preset("paper") == ForeBackConfig()  # the name is not a setting


def test_the_package_exports_the_reversion_and_evaluation_api() -> None:
    from preempt_cli.evaluate import Evaluator, reversion_protocol
    from preempt_cli.revert import Reverter

    assert preempt_cli.Reverter is Reverter
    assert preempt_cli.Evaluator is Evaluator
    assert preempt_cli.reversion_protocol is reversion_protocol
    for name in ("load_dataset", "DefenseSpec", "AttackSpec"):
        assert name in preempt_cli.__all__ and getattr(preempt_cli, name)


def test_one_protector_shared_by_threads_gives_each_call_its_bits(protector, images) -> None:
    from concurrent.futures import ThreadPoolExecutor

    expected = protector.protect(images)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: protector.protect(images), range(4)))
    assert all(torch.equal(r, expected) for r in results)


def test_run_takes_paths_as_collect_inputs_gives_them(tmp_path) -> None:
    # run() given paths (not InputFile items) failed with AttributeError; a plain str was walked per character
    write_random_pngs(tmp_path / "in", n=2)
    protector = Protector(make_tiny_model(0).to(TEST_DEVICE), labels="backbone", config=ForeBackConfig(samples=1))
    for k, items in enumerate(([tmp_path / "in"], [str(tmp_path / "in")], str(tmp_path / "in"))):
        results = list(protector.run(items, RunOptions(out_dir=tmp_path / f"out{k}")))
        assert sorted(r.status for r in results) == ["done", "done"], results


def test_reduce_overhead_off_a_gpu_compiles_as_default_and_says_so(caplog) -> None:
    # its CUDA graphs need a GPU; on a CPU torch printed "No CUDA runtime is found" and went on silently
    engine = FastPreemption(make_tiny_model(0), device="cpu", compile="reduce-overhead")
    assert engine.compile == "default"
    assert any("reduce-overhead" in r.getMessage() and "GPU" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGINT") or __import__("os").name != "posix",
                    reason="POSIX signals")  # fmt: skip
@pytest.mark.parametrize("io", ["threads", "processes"])
@pytest.mark.parametrize("to_thread", [False, True], ids=["signal", "signal-taken-by-another-thread"])
def test_an_interrupt_during_a_batch_writes_that_batch_and_starts_no_other(tmp_path: Path, tiny_backbone, io: str,
                                                                           to_thread: bool,
                                                                           monkeypatch) -> None:  # fmt: skip
    """Ctrl-C (SIGTERM in the command) while a batch computes: a batch cannot be cut short, so the run waited
    for it (a large photo on a CPU: seconds), then threw its result away; the files were lost and the
    wait wasted. The batch is now written and reported before the interrupt goes on; no later batch starts.

    ``to_thread``: a signal that does not wake the main thread, blocked waiting for the batch (one that came
    just before it blocked, or that the kernel gave another thread): Python raises the KeyboardInterrupt
    only where the main thread runs again, and the run took it once the batch was done, after the next had
    started (a rare failure of this test under load, the signal to the process). The run now takes it at
    once."""
    import threading

    write_random_pngs(tmp_path / "in", n=6)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2))
    started, release, batches = threading.Event(), threading.Event(), []
    released_by_the_run: list[bool] = []  # True: the run, having taken the interrupt; False: the deadline
    transform = protector.transform_levels

    def slow_transform(*args, **kw):  # the compute thread's batch: held until the interrupt has come
        batches.append(args[0].shape[0])
        started.set()
        release.wait(30)
        return transform(*args, **kw)

    def release_batch() -> None:
        released_by_the_run.append(threading.current_thread() is threading.main_thread())
        release.set()

    protector.transform_levels = slow_transform

    # the interrupt comes to the main thread, which waits for the batch; the batch goes on once the run has
    # taken it (at the latest 5 s after it started)
    deadline = interrupt_run_once(started, release_batch, monkeypatch, deadline=5, to_thread=to_thread)
    results = []
    with pytest.raises(KeyboardInterrupt):
        for result in protector.run([tmp_path / "in"], RunOptions(out_dir=tmp_path / "out", batch_size=2, io=io,
                                                                  workers=2)):  # fmt: skip
            results.append(result)
    release.set()
    deadline.cancel()
    protector.close()
    written = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert released_by_the_run[:1] == [True], "the batch went on at the deadline: the run had not taken the interrupt"
    assert batches == [2] and [r.status for r in results] == ["done", "done"], [(r.status, r.reason) for r in results]
    assert written == sorted(r.output.name for r in results)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_predict_and_confidence_refuse_what_protect_refuses(tiny_backbone) -> None:
    """A uint8 batch gave labels of its 0..255 values, and labels as a list an AttributeError."""
    from preempt_cli import ForeBackConfig, Protector
    from preempt_cli.errors import InputError

    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2))
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match="for uint8 use x.float"):
        protector.predict((x * 255).to(torch.uint8))
    with pytest.raises(InputError, match="labels must be a torch.Tensor"):
        protector.confidence(x, [0, 1])
    assert protector.confidence(x, protector.predict(x)).shape == (2,)


def test_images_the_api_cannot_take_are_input_errors_at_every_entry_point(tmp_path: Path, tiny_backbone) -> None:
    """README: images or labels of the wrong type, dtype, shape or value raise InputError. The quality
    metrics, BiLevel and Evaluator's data raised a bare ConfigError (a caller catching that still does), with
    no hint (a uint8 batch now is told x.float() / 255); Protector and Reverter raised InputError already."""
    from preempt_cli import Reverter
    from preempt_cli.baselines import BiLevel
    from preempt_cli.evaluate import Dataset, Evaluator
    from preempt_cli.quality import lpips_distance, perturbation_map, save_perturbation_figure, ssim

    x = torch.rand(2, 3, 32, 32)
    x8 = (x * 255).to(torch.uint8)
    was_config_error = {
        "ssim": lambda: ssim(x8, x8),
        "perturbation_map": lambda: perturbation_map(x8, x8, 8 / 255),
        "lpips_distance": lambda: lpips_distance(x8, x8),
        "save_perturbation_figure": lambda: save_perturbation_figure(tmp_path / "f.png", x8, x8, 8 / 255),
        "BiLevel.perturb": lambda: BiLevel(tiny_backbone).perturb(x8, torch.tensor([0, 1])),
    }
    for entry, run in was_config_error.items():
        with pytest.raises(InputError, match=r"for uint8 use x\.float\(\) / 255") as caught:
            run()
        assert isinstance(caught.value, ConfigError), entry
    with pytest.raises(InputError, match="uint8 \\[N, C, H, W\\] tensor") as caught:  # float: divided by 255 twice
        Evaluator(Dataset(tmp_path, [tmp_path / "a.png"] * 2, x, torch.tensor([0, 1])), load=None, device="cpu")
    assert isinstance(caught.value, ConfigError)
    with pytest.raises(InputError, match=r"for uint8 use x\.float\(\) / 255"):
        Reverter(tiny_backbone, labels="backbone").protect(x8)


# -- 0.17.0: the API's arguments checked where the CLI's were -----------------------------------------------
def test_bad_arguments_of_the_api_are_preempt_errors_naming_them(tmp_path: Path, tiny_backbone) -> None:
    from preempt_cli.errors import ConfigError, InputError, PreemptError
    from preempt_cli.evaluate import Dataset, Evaluator

    with pytest.raises(ConfigError, match="labels must be classifier, backbone, folders or a LabelMap"):
        Protector(tiny_backbone, labels=None)  # the run failed deep inside (AttributeError)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1))
    x = torch.rand(2, 3, 32, 32, device=TEST_DEVICE)
    for seeds, said in (([1], "1 noise seeds for 2 images"), ([-1, 2], "0..2\\*\\*64-1"), ([1.9, 2], "0..2\\*\\*64-1"),
                        ("ab", "sequence of whole numbers")):  # fmt: skip
        with pytest.raises(InputError, match=said):
            protector.protect(x, noise_seeds=seeds)
    # -100 is cross_entropy's ignored label: that image took no step, silently (now it fails as -1 does).
    # transform leaves values unchecked, and on CUDA such a label is a device-side assert that ends the
    # process's use of the GPU: there only protect's check is tried.
    if TEST_DEVICE.type == "cpu":
        with pytest.raises((IndexError, RuntimeError)):
            protector.transform(x, torch.tensor([-100, 1], device=TEST_DEVICE))
    with pytest.raises(InputError, match=r"labels must be class indices in \[0, 10\), got values from -100 to 1"):
        protector.protect(x, torch.tensor([-100, 1], device=TEST_DEVICE))
    with pytest.raises(InputError, match=r"float images in \[0, 1\], got a torch.uint8 tensor .*x.float\(\) / 255"):
        tiny_backbone((x * 255).byte())
    assert tiny_backbone(x.double()).dtype == torch.float32
    data = Dataset(tmp_path, [tmp_path / "a.png"] * 2, (x.cpu() * 255).byte(), torch.tensor([0, 1]))
    for bad in (dict(batch_size=-1), dict(batch_size=0), dict(attack_batch_size=0)):
        with pytest.raises(ConfigError, match="must be a whole number >= 1"):
            Evaluator(data, load=lambda n: tiny_backbone, device="cpu", **bad)
    with pytest.raises(ConfigError, match="uint8 \\[N, C, H, W\\] tensor"):  # float: divided by 255 twice
        Evaluator(Dataset(tmp_path, data.paths, data.images.float() / 255, data.labels), load=None, device="cpu")
    with pytest.raises(ConfigError, match="2 integer class indices"):
        Evaluator(Dataset(tmp_path, data.paths, data.images, torch.tensor([0])), load=None, device="cpu")
    assert Evaluator(data, load=None, device="cpu", out_dir=str(tmp_path / "o")).out_dir == tmp_path / "o"
    for bad in (3, None):
        with pytest.raises(ConfigError, match="registry name or a ModelConfig"):
            preempt_cli.load_model(bad)
    for kwargs, said in ((dict(device="gpu"), "unknown device 'gpu'"), (dict(config={"samples": 2}), "must be a ForeBackConfig")):
        with pytest.raises(ConfigError, match=said):  # torch's RuntimeError; an AttributeError deep inside
            FastPreemption(tiny_backbone, **kwargs)
    with pytest.raises(PreemptError):
        read_image(tmp_path / "a.png", max_pixels=1.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_torch_device_is_checked_as_a_name_is() -> None:
    from preempt_cli.device import resolve_device
    from preempt_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(torch.device("cuda"))  # torch's error came only after the weights were read
    with pytest.raises(ConfigError, match="unsupported device 'meta'"):
        resolve_device(torch.device("meta"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_net_of_another_dtype_is_wrapped_with_its_normalization(dtype) -> None:
    """A net cast before it is wrapped (``net.double()``, ``net.bfloat16()``) took its images in the dtype of
    the wrapper's mean and std, float32, and failed in its first layer ("Input type (float) and bias type
    (double) should be the same"); a net without mean and std, or a wrapper cast whole, worked."""
    from preempt_cli import ImageModel

    net = make_tiny_model().net.to(dtype)
    model = ImageModel(net, tiny_config("cast", mean=(0.5,) * 3, std=(0.25,) * 3))
    x = torch.rand(2, 3, 32, 32)
    assert model(x).dtype == dtype
    float32 = ImageModel(make_tiny_model().net, tiny_config("float32", mean=(0.5,) * 3, std=(0.25,) * 3))
    tolerance = 1e-5 if dtype == torch.float64 else 0.1
    assert torch.allclose(model(x).float(), float32(x), atol=tolerance)
    out = Protector(model, labels="backbone", config=FAST).protect(x)
    assert out.dtype == torch.float32 and (out - x).abs().max() <= FAST.eps + 1e-6


def test_models_are_float32_whatever_torchs_default_dtype() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = preempt_cli.load_model("preempt-resnet20-at")
        out = Protector(model, config=ForeBackConfig(samples=1)).protect(torch.rand(1, 3, 32, 32, dtype=torch.float32))
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())


def _argument_types(cls: type, name: str) -> tuple[object, ...]:
    """The types a type checker takes for ``cls(name=...)`` (the package ships py.typed): a dataclass field
    that is a descriptor takes what its ``__set__`` takes (mypy and pyright read it so), other arguments
    their annotation."""
    import typing

    hint = typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
    if hint is not None and hasattr(hint, "__set__"):
        hint = typing.get_type_hints(hint.__set__)["value"]
    elif hint is None:
        hint = typing.get_type_hints(cls.__init__)[name]
    return typing.get_args(hint) or (hint,)


def test_out_dir_is_typed_to_take_a_str_as_readme_passes_it_and_kept_a_path(tmp_path: Path) -> None:
    """README passes RunOptions(out_dir="out"), which a mypy user was told is no ``Path | None``."""
    import copy
    import os
    import pickle

    from preempt_cli.errors import ConfigError
    from preempt_cli.evaluate import Dataset, Evaluator

    for cls in (RunOptions, Evaluator):
        assert {str, os.PathLike[str], type(None)} <= set(_argument_types(cls, "out_dir")), cls
    options = RunOptions(out_dir="out")
    assert options.out_dir == Path("out") and type(options.out_dir) is type(Path("out"))
    assert dataclasses.replace(options, overwrite=True).out_dir == Path("out")
    for kept in (copy.copy(options), pickle.loads(pickle.dumps(options))):  # as the worker processes get it
        assert kept.out_dir == Path("out") and kept == options
    options.out_dir = str(tmp_path)  # set later: kept a Path too
    assert options.out_dir == tmp_path and RunOptions().out_dir is None
    data = Dataset(tmp_path, [tmp_path / "a.png"], torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([0]))
    assert Evaluator(data, load=None, device="cpu", out_dir=os.fspath(tmp_path)).out_dir == tmp_path
    with pytest.raises(ConfigError, match="out_dir must be a folder's path") as caught:  # a TypeError before
        Evaluator(data, load=None, device="cpu", out_dir=3)  # type: ignore[arg-type]
    assert isinstance(caught.value, TypeError)


def test_run_options_refuse_values_that_did_something_else(tmp_path: Path, tiny_backbone, monkeypatch) -> None:
    from preempt_cli.errors import ConfigError
    from preempt_cli.protect import run_on_devices

    for bad, said in ((dict(out_dir=3), "out_dir must be a folder's path"), (dict(out_dir=""), "out_dir must be"),
                      (dict(overwrite="no"), "overwrite must be True or False"), (dict(fsync=1), "fsync must be")):  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            RunOptions(**bad)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~" / "x").mkdir(parents=True)  # left by an earlier mistake: outputs still go home
    assert RunOptions(out_dir="~/x").out_dir == tmp_path / "home" / "x"
    write_random_pngs(tmp_path / "in", n=2)
    (tmp_path / "afile").write_text("")
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1))
    with pytest.raises(ConfigError, match="not a folder"):  # each file failed after its work
        list(protector.run([tmp_path / "in"], RunOptions(out_dir=tmp_path / "afile")))
    with pytest.raises(ConfigError, match="at least one protector"):
        list(run_on_devices([], [tmp_path / "in"]))
    with pytest.raises(ConfigError, match="partition is run_on_devices'"):  # silently replaced
        list(run_on_devices([protector, protector], [tmp_path / "in"], RunOptions(partition=(0, 2))))
    items = collect_inputs([tmp_path / "in"])
    results = list(protector.run([items[0], items[0], items[1]], RunOptions(out_dir=tmp_path / "out")))
    assert sorted(r.status for r in results) == ["done", "done"]  # once each (the twin failed as "another run?")


def test_freezing_long_lived_objects_does_not_keep_the_callers_garbage(monkeypatch) -> None:
    """gc.freeze() took a reference cycle that was already garbage (not yet collected) out of collection for
    the life of the process: a batch job's 200 MB were kept. The first run of a process collects it first."""
    import gc
    import weakref

    from preempt_cli import protect as protect_module

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    monkeypatch.setattr(protect_module, "_garbage_collected_once", False)
    was_enabled = gc.isenabled()
    gc.disable()  # the cycle stays uncollected until the freeze, as it may between two collections
    try:
        garbage = Cycle()
        ref = weakref.ref(garbage)
        del garbage
        with protect_module.long_lived_objects_frozen():
            assert ref() is None  # collected before the freeze, not held for the run
    finally:
        if was_enabled:
            gc.enable()


def test_a_run_leaves_the_callers_objects_collectable_after_it(tmp_path: Path, tiny_backbone) -> None:
    """A run froze the objects alive at its start for the rest of the process (gc.freeze): a caller's object in
    a reference cycle, alive then and dropped after the run (a notebook's, a service's), was never freed."""
    import gc
    import weakref

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    write_random_pngs(tmp_path / "in", n=2)
    frozen_before = gc.get_freeze_count()
    kept = Cycle()
    ref = weakref.ref(kept)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1))
    frozen_during = []
    for _ in protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out")):
        frozen_during.append(gc.get_freeze_count())
    assert gc.get_freeze_count() == frozen_before
    if frozen_before == 0:  # a process that froze nothing: the run froze what was alive (its GC pauses)
        assert min(frozen_during) > 0
    del kept
    gc.collect()
    assert ref() is None


# -- 0.19.x review of the API as a batch job meets it ----------------------------------------------------------
def test_a_reversion_is_not_in_the_autograd_graph_of_its_input(tiny_backbone, images) -> None:
    """``Reverter.protect`` of an input that requires grad gave an output in the caller's autograd graph
    (``requires_grad``, a ``grad_fn``: ``.numpy()`` refused it), where ``Protector.protect`` gives a plain one."""
    from preempt_cli import Reverter

    reverter = Reverter(tiny_backbone, config=FAST, seed=5)
    x = images[:2].clone().requires_grad_(True)
    got = reverter.protect(x)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(got, reverter.protect(images[:2]))
    got.cpu().numpy()  # as a batch job saves it
    assert x.grad is None and x.requires_grad


def test_what_the_protector_refuses_on_purpose_is_a_preempt_error(tmp_path: Path, tiny_backbone) -> None:
    """A model name where a loaded model goes, a config of settings as a dict, paths mixed with inputs: plain
    TypeErrors, which a batch job's ``except PreemptError`` let through (still TypeErrors)."""
    from preempt_cli.errors import PreemptError

    for make in (lambda: Protector("cifar10-resnet20-pgdat-a"),
                 lambda: Protector(torch.nn.Linear(3, 10)),
                 lambda: Protector(tiny_backbone, config={"samples": 2})):  # fmt: skip
        with pytest.raises(PreemptError) as caught:
            make()
        assert isinstance(caught.value, TypeError)
    write_random_pngs(tmp_path / "in", n=1)
    protector = Protector(tiny_backbone, config=FAST)
    mixed = [*collect_inputs([tmp_path / "in"]), tmp_path / "in"]
    with pytest.raises(PreemptError, match="not both") as caught:
        list(protector.run(mixed, RunOptions(out_dir=tmp_path / "out")))
    assert isinstance(caught.value, TypeError)


def test_a_model_name_that_is_no_string_is_a_config_error() -> None:
    """``get_model_config(3)`` failed with AttributeError ('int' object has no attribute 'lower'), where
    ``load_model(3)`` says what is wrong."""
    from preempt_cli import get_model_config
    from preempt_cli.errors import ConfigError

    for bad in (3, None, Path("preempt-resnet20-at")):
        with pytest.raises(ConfigError, match="model name must be a string"):
            get_model_config(bad)


def test_write_png_refuses_colours_it_cannot_write_with_a_preempt_error(tmp_path: Path) -> None:
    """Float colours (a protected tensor as it comes) were a plain ValueError; a list or a tensor an
    AttributeError."""
    from preempt_cli import write_png
    from preempt_cli.errors import InputError

    path = write_random_pngs(tmp_path, n=1)[0]
    picture = read_image(path)
    for bad in (picture.color.astype(np.float32) / 255, picture.color.tolist(), torch.from_numpy(picture.color.copy())):
        with pytest.raises(InputError, match="colour"):
            write_png(tmp_path / "out.png", picture, bad)
    assert not (tmp_path / "out.png").exists()


def test_protect_names_its_noise_seeds_argument(protector, images) -> None:
    """``protect(x, y, **kw)`` hid ``noise_seeds`` from signatures and type checkers; a misspelt keyword was
    refused by ``transform``, a method the caller never called."""
    import inspect

    assert "noise_seeds" in inspect.signature(Protector.protect).parameters
    with pytest.raises(TypeError, match="protect"):
        protector.protect(images[:1], noise_seed=[1])


def test_run_options_that_are_no_run_options_are_an_input_error(protector, tmp_path: Path) -> None:
    """A dict of options (``run(paths, {"out_dir": ...})``) failed with AttributeError ('dict' object has no
    attribute 'out_dir'), which a batch job's ``except PreemptError`` missed."""
    from preempt_cli.errors import InputError, PreemptError

    with pytest.raises(InputError, match="options must be a RunOptions .*got dict") as caught:
        list(protector.run([tmp_path], {"out_dir": tmp_path / "out"}))
    assert isinstance(caught.value, PreemptError) and isinstance(caught.value, TypeError)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["verify_hash", "fuse"])
def test_load_model_switches_that_are_no_bools_are_a_config_error(flag: str) -> None:
    """``load_model(verify_hash="no")`` took the string for true without a word (the pin checked, where the
    caller asked for none); the switches are now checked before anything is read."""
    from preempt_cli import load_model
    from preempt_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{flag} must be True or False, got 'no'"):
        load_model("no-such-model", **{flag: "no"})


# -- 0.21.x review of the API as a batch job meets it ----------------------------------------------------------
def test_a_rerun_tells_apart_the_weights_of_nets_without_a_file(tmp_path: Path) -> None:
    """A net of the caller's in an ``ImageModel`` (or timm's own weights) has no weights file, so no sha256
    was recorded: a re-run with other weights under the same name skipped the old outputs as done."""
    write_random_pngs(tmp_path / "in", n=1)

    def statuses(backbone, classifier=None, out="out") -> list[str]:
        protector = Protector(backbone, classifier, config=FAST)
        return [f"{r.status} {r.reason}" for r in protector.run([tmp_path / "in"], RunOptions(out_dir=tmp_path / out))]

    assert statuses(make_tiny_model(0)) == ["done "]
    assert statuses(make_tiny_model(0))[0].startswith("skipped")  # the same weights: done already
    assert statuses(make_tiny_model(0, name="renamed"))[0].startswith("skipped")  # as a renamed file is the same
    [retrained] = statuses(make_tiny_model(1))
    assert retrained.startswith("failed") and "other settings (backbone tiny-cnn (sha256" in retrained
    assert statuses(make_tiny_model(0), make_tiny_model(2, name="c"), out="c") == ["done "]
    [relabelled] = statuses(make_tiny_model(0), make_tiny_model(3, name="c"), out="c")
    assert relabelled.startswith("failed") and "classifier c (sha256" in relabelled


def test_the_package_exports_every_error_class_and_nothing_private() -> None:
    """``from preempt_cli import InputError`` failed: of the errors README names, only PreemptError was exported."""
    import inspect

    from preempt_cli import errors

    classes = [n for n in errors.__all__ if inspect.isclass(getattr(errors, n))]
    assert {"ConfigError", "InputError", "ImageReadError", "UnknownModelError", "WeightsNotFoundError"} <= set(classes)
    for name in classes:
        assert name in preempt_cli.__all__ and getattr(preempt_cli, name) is getattr(errors, name), name
    assert not [n for n in preempt_cli.__all__ if n.startswith("_") and n != "__version__"]
    assert all(getattr(preempt_cli, n) is not None for n in preempt_cli.__all__)


def _errors_as_raised() -> list[BaseException]:
    """One error of each exception class of ``preempt_cli.errors.__all__`` (and the errors of preempt's own
    that other modules define), made with representative arguments as preempt raises them."""
    import errno

    from preempt_cli import errors
    from preempt_cli.cli._common import StdoutWriteError
    from preempt_cli.quality import LpipsUnavailableError

    path = Path("models") / "m.safetensors"
    return [
        errors.PreemptError("something went wrong"),
        errors.ConfigError("--eps 2: more than 1"),
        errors.RegistryError("models.toml", "line 3: no arch"),
        errors.UnknownModelError("resnet", ["preempt-resnet20-at", "preempt-resnet20-std"]),
        errors.WeightsNotFoundError("m", path),
        errors.WeightsNotFoundError("m", "hf://org/repo/m.safetensors", "download it", reason="a folder is there"),
        errors.OfflineWeightsError("m", "hf://org/repo/m.safetensors", "HF_HUB_OFFLINE is set"),
        errors.HashMismatchError("m", path, "ab" * 32, "cd" * 32),
        errors.UnsafeWeightsError("m", path),
        errors.WeightsMetadataMismatchError("m", path, "saved for 100 classes"),
        errors.NonFiniteWeightsError("m", path, "3 NaN values"),
        errors.UnreadableWeightsError("m", path, "header too short", "fetch it again"),
        errors.WeightsMismatchError("m", path, "missing key fc.weight"),
        errors.ImageReadError("in/a.png", "no such file", errno=errno.ENOENT),
        errors.ImageReadError(Path("in/b.png"), "not an image"),
        errors.ImageWriteError("out/a.png", "cannot write: No space left on device", errno=errno.ENOSPC),
        errors.LabelError("no label for in/a.png"),
        errors.InputError("images must be a uint8 array"),
        errors.InputConfigError("eps must be a number"),
        errors.InputLabelError("label 12 is not a class of the model"),
        errors.MissingDependencyError("lpips", "LPIPS"),
        StdoutWriteError("cannot write the results to stdout: No space left on device"),
        LpipsUnavailableError("the lpips package is missing"),
    ]


#: The fields of the standard exceptions, kept outside an error's __dict__, that code reads.
_STANDARD_FIELDS = {OSError: ("errno", "strerror", "filename", "filename2"), ImportError: ("msg", "name", "path")}


def test_every_error_class_survives_pickling_with_its_fields_and_message() -> None:
    """Errors with an ``__init__`` of their own (ImageReadError(path, reason), UnknownModelError(name, known))
    could not be unpickled: pickle re-created them with their message alone, and a ProcessPoolExecutor's
    caller got a TypeError in place of the error its worker raised."""
    import copy
    import inspect
    import pickle

    from preempt_cli import errors

    made = _errors_as_raised()
    public = {getattr(errors, n) for n in errors.__all__ if inspect.isclass(getattr(errors, n))}
    assert public <= {type(e) for e in made}, "an error class to add to _errors_as_raised"
    for error in made:
        for back in (pickle.loads(pickle.dumps(error)), copy.deepcopy(error)):
            assert type(back) is type(error) and str(back) == str(error) and back.args == error.args, error
            assert vars(back) == vars(error), error
            for base, fields in _STANDARD_FIELDS.items():
                if isinstance(error, base):
                    assert [getattr(back, f) for f in fields] == [getattr(error, f) for f in fields], error
