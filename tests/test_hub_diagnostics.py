"""What preempt says about weights that cannot be used: damaged files (not "a pickle"), architecture
mismatches in one short line, an input_size the architecture cannot take, the Hub out of reach."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import set_hf_cache
from preempt_cli.errors import OfflineWeightsError, RegistryError, UnsafeWeightsError, WeightsMismatchError
from preempt_cli.errors import UnreadableWeightsError
from preempt_cli.hub import check_safetensors_header
from preempt_cli.models import create_arch, load_model
from preempt_cli.registry import ModelConfig, parse_source

pytestmark = pytest.mark.usefixtures("isolated_config")

ROW = 'arch = "cifar_resnet20"\narch_args = { shortcut = "pad_end" }\n'


def _registry(tmp_path: Path, rows: dict[str, str]) -> Path:
    path = tmp_path / "r.toml"
    path.write_text("".join(f'[models.{name}]\n{ROW}source = "{file}"\n' for name, file in rows.items()))
    return path


def _resnet20_bytes(tmp_path: Path) -> bytes:
    save_file(create_arch("cifar_resnet20", shortcut="pad_end").state_dict(), str(tmp_path / "full.safetensors"))
    return (tmp_path / "full.safetensors").read_bytes()


@pytest.mark.parametrize("cut", ["empty", "four-bytes", "header-cut", "data-cut"])
def test_damaged_safetensors_are_called_damaged_not_pickles(cut, tmp_path) -> None:
    data = _resnet20_bytes(tmp_path)
    content = {"empty": b"", "four-bytes": b"abcd", "header-cut": data[:100], "data-cut": data[: len(data) // 2]}[cut]
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnreadableWeightsError) as info:
        load_model("m", registry=[_registry(tmp_path, {"m": "w.safetensors"})])
    message = str(info.value)
    assert isinstance(info.value, UnsafeWeightsError)  # refused like any file that is not safetensors
    assert str(path) in message and "not a readable safetensors file" in message, message
    assert "pickle" not in message and "convert" not in message and "do not fit" not in message, message
    if cut != "data-cut":  # found by the header check alone, before anything parses the file
        with pytest.raises(UnreadableWeightsError):
            check_safetensors_header("m", path)


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_real_checkpoints_still_get_the_convert_hint(zipfile_format, tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(UnsafeWeightsError) as info:
        check_safetensors_header("m", path)
    assert not isinstance(info.value, UnreadableWeightsError)
    assert "preempt models convert" in str(info.value)


def test_architecture_mismatch_is_one_short_line(tmp_path) -> None:
    save_file(create_arch("resnet18_cifar").state_dict(), str(tmp_path / "r18.safetensors"))
    net = create_arch("cifar_resnet20", shortcut="pad_end", num_classes=100)
    save_file(net.state_dict(), str(tmp_path / "c100.safetensors"))
    prefixed = {f"module.{k}": v for k, v in create_arch("cifar_resnet20", shortcut="pad_end").state_dict().items()}
    save_file(prefixed, str(tmp_path / "prefixed.safetensors"))
    registry = _registry(tmp_path, {"r18": "r18.safetensors", "c100": "c100.safetensors", "prefixed": "prefixed.safetensors"})
    with pytest.raises(WeightsMismatchError) as info:
        load_model("r18", registry=[registry])
    message = str(info.value)
    assert "\n" not in message and len(message) < 800, (len(message), message)
    assert "keys missing" in message and "unexpected keys" in message and "of another shape" in message
    assert "more" in message  # the rest counted, not listed
    with pytest.raises(WeightsMismatchError) as info:
        load_model("c100", registry=[registry])
    assert "'fc.weight': file [100, 64], architecture [10, 64]" in str(info.value)
    with pytest.raises(WeightsMismatchError, match="none of the file's keys fit") as info:
        load_model("prefixed", registry=[registry])
    assert len(str(info.value)) < 800


def test_weights_without_num_batches_tracked_still_load(tmp_path) -> None:
    state = {k: v for k, v in create_arch("cifar_resnet20", shortcut="pad_end").state_dict().items()
             if not k.endswith("num_batches_tracked")}  # fmt: skip
    save_file(state, str(tmp_path / "old.safetensors"))
    load_model("old", registry=[_registry(tmp_path, {"old": "old.safetensors"})])


def test_input_size_with_other_channels_than_the_arch_is_a_registry_error(tmp_path) -> None:
    save_file(create_arch("cifar_resnet20", shortcut="pad_end").state_dict(), str(tmp_path / "w.safetensors"))
    registry = tmp_path / "r.toml"
    registry.write_text(f'[models.gray]\n{ROW}source = "w.safetensors"\ninput_size = [1, 32, 32]\n'
                        'mean = [0.5]\nstd = [0.25]\n')  # fmt: skip
    with pytest.raises(RegistryError) as info:
        load_model("gray", registry=[registry])
    message = str(info.value)
    assert str(registry) in message and "'gray'" in message and "3-channel" in message and "input_size" in message

    from typer.testing import CliRunner

    from preempt_cli.cli import app

    result = CliRunner().invoke(app, ["models", "verify", "gray", "--registry", str(registry)])
    assert result.exit_code == 1 and "internal error" not in result.stderr, result.output
    assert "3-channel" in result.stderr


def _unreachable(*args, **kwargs):
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise httpx2.ConnectError("[Errno -2] Name or service not known")
    except httpx2.ConnectError as e:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                      "cannot find the requested files in the local cache.") from e  # fmt: skip


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-network"])
def test_unreachable_hub_hint_fits_the_situation(offline, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    set_hf_cache(monkeypatch, tmp_path / "hub", offline=offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _unreachable)
    cfg = ModelConfig(name="h", arch="cifar_resnet20", source=parse_source("hf://org/repo/m.safetensors"))
    with pytest.raises(OfflineWeightsError) as info:
        load_model(cfg)
    message = str(info.value)
    assert "\n" not in message and "hf://org/repo/m.safetensors" in message and "--registry" in message
    if offline:
        assert "unset HF_HUB_OFFLINE" in message
    else:
        assert "unset HF_HUB_OFFLINE" not in message, message  # it is not set: nothing to unset
        assert "HF_HUB_OFFLINE=1 spares the Hub's retries" in message, message  # setting it fails at once
        assert "Name or service not known" in message and "network" in message, message


def test_a_header_length_that_looks_like_a_pickle_opcode_is_still_safetensors(tmp_path) -> None:
    import json

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x280 - len(header))  # length 0x280: the file starts 80 02, as a pickle (PROTO 2) does
    path = tmp_path / "w.safetensors"
    path.write_bytes((0x280).to_bytes(8, "little") + header + b"\0\0\0\0")
    check_safetensors_header("m", path)
