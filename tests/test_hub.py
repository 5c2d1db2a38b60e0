"""Weights resolution: local files, the Hugging Face cache offline, sha256 pins, pickle refusal, load_model."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import raised_without_waiting_on, set_hf_cache
from preempt_cli.errors import (
    ConfigError,
    HashMismatchError,
    OfflineWeightsError,
    PreemptError,
    RegistryError,
    UnreadableWeightsError,
    UnsafeWeightsError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from preempt_cli.hub import check_safetensors_header, resolve_weights, sha256_file
from preempt_cli.models import ImageModel, create_arch, load_model
from preempt_cli.registry import ModelConfig, Source, get_model_config

pytestmark = pytest.mark.usefixtures("isolated_config")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)


def _tiny_safetensors(path: Path, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 3), value)}, str(path))
    return path


def _cfg(location: str, *, sha256: str | None = None, registry_file: Path | None = None, notes: str = "") -> ModelConfig:
    return ModelConfig(
        name="tiny", arch="cifar_resnet20", source=Source("file", location), sha256=sha256,
        registry_file=registry_file, notes=notes,
    )  # fmt: skip


def _hf_cfg(source: str, sha256: str | None = None) -> ModelConfig:
    from preempt_cli.registry import parse_source

    return ModelConfig(name="tiny-hf", arch="cifar_resnet20", source=parse_source(source), sha256=sha256)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_hf_cache(
    cache: Path, repo_id: str, filename: str, data: bytes, *, commit: str = COMMIT, symlink: bool = True,
    refs: tuple[str, ...] = ("main",),
) -> Path:  # fmt: skip
    """Lay out ``data`` as huggingface_hub's cache does: blobs/<hash>, snapshots/<commit>/<file>, refs/<ref>."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = repo_dir / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if symlink:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    else:
        pointer.write_bytes(data)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return pointer


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp, offline."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    set_hf_cache(monkeypatch, cache, offline=True)
    return cache


# -- local files --------------------------------------------------------------------------------------------


def test_local_file_from_models_dir(tmp_path) -> None:
    weights = _tiny_safetensors(tmp_path / "models" / "w.safetensors")
    assert resolve_weights(_cfg("w.safetensors"), tmp_path / "models") == weights
    # Sub-folders of the models dir and absolute paths work too.
    nested = _tiny_safetensors(tmp_path / "models" / "sub" / "n.safetensors")
    assert resolve_weights(_cfg("sub/n.safetensors"), tmp_path / "models") == nested
    assert resolve_weights(_cfg(str(nested))) == nested


def test_local_file_from_env_models_dir(tmp_path, monkeypatch) -> None:
    weights = _tiny_safetensors(tmp_path / "env-models" / "w.safetensors")
    monkeypatch.setenv("PREEMPT_MODELS_DIR", str(tmp_path / "env-models"))
    assert resolve_weights(_cfg("w.safetensors")) == weights
    # An explicit models dir is looked in first.
    explicit = _tiny_safetensors(tmp_path / "explicit" / "w.safetensors", 2.0)
    assert resolve_weights(_cfg("w.safetensors"), tmp_path / "explicit") == explicit
    # ... but the env dir is still a fallback when the explicit one lacks the file.
    assert resolve_weights(_cfg("w.safetensors"), tmp_path / "empty") == weights


def test_local_file_relative_to_the_registry_file(tmp_path, monkeypatch) -> None:
    reg_dir = tmp_path / "team"
    weights = _tiny_safetensors(reg_dir / "keys" / "k.safetensors")
    registry = reg_dir / "models.toml"
    registry.write_text('[models.team-key]\narch = "cifar_resnet20"\nsource = "file:keys/k.safetensors"\n')
    monkeypatch.chdir(tmp_path)  # not the registry's folder
    cfg = get_model_config("team-key", [registry])
    assert resolve_weights(cfg) == weights
    # models dir and env dir take precedence over the registry's folder.
    env_w = _tiny_safetensors(tmp_path / "env" / "keys" / "k.safetensors", 3.0)
    monkeypatch.setenv("PREEMPT_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_weights(cfg) == env_w
    explicit = _tiny_safetensors(tmp_path / "explicit" / "keys" / "k.safetensors", 4.0)
    assert resolve_weights(cfg, tmp_path / "explicit") == explicit


def test_missing_local_file_says_to_pass_models_dir(tmp_path) -> None:
    cfg = _cfg("absent.safetensors", notes="Ask the team for the key file.")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(cfg, tmp_path / "models")
    message = str(info.value)
    assert "'tiny'" in message and "absent.safetensors" in message
    assert "--models-dir" in message and "PREEMPT_MODELS_DIR" in message
    assert str(tmp_path / "models") in message  # where it looked
    assert "Ask the team for the key file." in message
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == tmp_path / "models" / "absent.safetensors"


def test_a_source_naming_a_folder_is_called_a_folder_not_missing(tmp_path, monkeypatch) -> None:
    # "not found at DIR" of a folder that is there sent the user looking for what exists
    folder = tmp_path / "models" / "keys"
    folder.mkdir(parents=True)
    for cfg, models_dir in ((_cfg(str(folder)), None), (_cfg("keys"), tmp_path / "models")):
        with pytest.raises(WeightsNotFoundError) as info:
            resolve_weights(cfg, models_dir)
        message = str(info.value)
        assert f"{folder} is a folder, not a weights file" in message and "not found" not in message, message
    # a file further down the search order is still taken
    weights = _tiny_safetensors(tmp_path / "env" / "keys")
    monkeypatch.setenv("PREEMPT_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_weights(_cfg("keys"), tmp_path / "models") == weights



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_source_naming_a_fifo_or_a_broken_link_says_what_is_there(tmp_path, monkeypatch) -> None:
    # "not found at" a file that is there (a FIFO, a looping or dangling link) sent the user looking for it
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    said = {"fifo": "is a FIFO (a named pipe), not a weights file",
            "loop": "cannot be read: Too many levels of symbolic links",
            "dangling": f"is a symbolic link to {tmp_path / 'gone.safetensors'}, which is missing"}  # fmt: skip
    for name, words in said.items():
        with pytest.raises(WeightsNotFoundError) as info:
            load_model(_cfg(f"{name}.safetensors"), models_dir=tmp_path)
        message = str(info.value)
        assert f"{tmp_path / name}.safetensors {words}" in message and "not found" not in message, message
    # a file further down the search order is still taken
    weights = _tiny_safetensors(tmp_path / "env" / "fifo.safetensors")
    monkeypatch.setenv("PREEMPT_MODELS_DIR", str(tmp_path / "env"))
    assert resolve_weights(_cfg("fifo.safetensors"), tmp_path) == weights


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_swapped_in_after_the_weights_were_found_is_refused_without_waiting(tmp_path, monkeypatch) -> None:
    """The file found is replaced by a FIFO before it is opened: a blocking open waited for a writer, forever."""
    import preempt_cli.hub as hub

    fifo = tmp_path / "k.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(hub, "_find_weights", lambda cfg, models_dir: fifo)
    def load() -> None:
        with hub.verified_weights(_cfg(str(fifo))):
            pass

    for name, read in (("verified_weights", load),
                       ("check_safetensors_header", lambda: hub.check_safetensors_header("tiny", fifo))):  # fmt: skip
        error = raised_without_waiting_on(fifo, read, name)
        assert isinstance(error, WeightsNotFoundError), error
        assert f"{fifo} is a FIFO (a named pipe), not a weights file" in str(error)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_swapped_in_after_the_header_check_is_refused_by_the_pin_check_without_waiting(tmp_path,
                                                                                             monkeypatch) -> None:
    """resolve_weights checks the header, then hashes the file for its pin: a FIFO swapped in between the two
    made the hash's blocking open wait for a writer, forever."""
    import preempt_cli.hub as hub

    fifo = tmp_path / "k.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(hub, "_find_weights", lambda cfg, models_dir: fifo)
    monkeypatch.setattr(hub, "check_safetensors_header", lambda model, path: None)  # it passed, then the swap
    error = raised_without_waiting_on(fifo, lambda: hub.resolve_weights(_cfg(str(fifo), sha256="0" * 64)),
                                      "resolve_weights")  # fmt: skip
    assert isinstance(error, WeightsNotFoundError), error
    assert f"{fifo} is a FIFO (a named pipe), not a weights file" in str(error)


def test_missing_shared_model_without_models_dir_is_explained() -> None:
    with pytest.raises(WeightsNotFoundError, match="--models-dir"):
        load_model("cifar10-resnet20-pgdat-a")


# -- sha256 pins ----------------------------------------------------------------------------------------------


def test_sha256_pin(tmp_path) -> None:
    weights = _tiny_safetensors(tmp_path / "w.safetensors")
    good = _sha(weights)
    assert sha256_file(weights) == good
    assert sha256_file(weights, chunk_size=7) == good
    assert resolve_weights(_cfg(str(weights), sha256=good)) == weights
    wrong = "0" * 64
    with pytest.raises(HashMismatchError) as info:
        resolve_weights(_cfg(str(weights), sha256=wrong))
    message = str(info.value)
    assert good in message and wrong in message and str(weights) in message
    assert info.value.expected == wrong and info.value.actual == good
    assert isinstance(info.value, ValueError)
    assert resolve_weights(_cfg(str(weights), sha256=wrong), verify_hash=False) == weights


def test_a_local_file_that_fails_its_pin_names_the_registry_to_fix_not_a_download(tmp_path) -> None:
    # a local file (a private key, made here and never uploaded) was told "download it again", and which of
    # the registries in effect pins it was not said
    weights = _tiny_safetensors(tmp_path / "key.safetensors")
    registry = tmp_path / "keys.toml"
    registry.write_text(f'[models.my-key]\narch = "cifar_resnet20"\nsource = "file:key.safetensors"\n'
                        f'sha256 = "{"0" * 64}"\n')  # fmt: skip
    with pytest.raises(HashMismatchError) as info:
        resolve_weights(get_model_config("my-key", [registry]))
    message = str(info.value)
    assert "'my-key'" in message and str(weights) in message and _sha(weights) in message
    assert f"fix the pin of its row in {registry}" in message, message
    assert "download" not in message, message


def test_load_model_checks_the_pin_before_loading(tmp_path, monkeypatch) -> None:
    net = create_arch("cifar_resnet20", shortcut="pad_end")
    save_file(net.state_dict(), str(tmp_path / "r20.safetensors"))
    registry = tmp_path / "r.toml"
    registry.write_text(
        f'[models.pinned]\narch = "cifar_resnet20"\narch_args = {{ shortcut = "pad_end" }}\n'
        f'source = "file:r20.safetensors"\nsha256 = "{"a" * 64}"\n'
    )
    import safetensors
    import safetensors.torch

    def no_load(*args, **kwargs):
        raise AssertionError("weights were parsed before the pin was checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_load)
    monkeypatch.setattr(safetensors.torch, "load", no_load)
    monkeypatch.setattr(safetensors, "safe_open", no_load)
    with pytest.raises(HashMismatchError):
        load_model("pinned", registry=[registry])


# -- pickles are refused ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("filename", ["ckpt.pt", "disguised.safetensors"])
def test_pickled_checkpoint_is_refused_without_unpickling(filename, zipfile_format, tmp_path, monkeypatch) -> None:
    net = create_arch("cifar_resnet20", shortcut="pad_end")
    path = tmp_path / "models" / filename
    path.parent.mkdir()
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=zipfile_format)
    registry = tmp_path / "r.toml"
    registry.write_text(
        f'[models.pickled]\narch = "cifar_resnet20"\narch_args = {{ shortcut = "pad_end" }}\nsource = "file:{filename}"\n'
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called on registered weights")

    import pickle

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(UnsafeWeightsError) as info:
        load_model("pickled", registry=[registry], models_dir=tmp_path / "models")
    message = str(info.value)
    assert str(path) in message and "pickle" in message and "preempt models convert" in message
    # Even with the hash check disabled (and a pin that matches), the file is refused.
    cfg = replace(get_model_config("pickled", [registry]), sha256=_sha(path))
    with pytest.raises(UnsafeWeightsError):
        resolve_weights(cfg, tmp_path / "models", verify_hash=False)
    with pytest.raises(UnsafeWeightsError):
        resolve_weights(cfg, tmp_path / "models")


@pytest.mark.parametrize("content", [b"", b"{}", b"\x08\x00\x00\x00\x00\x00\x00\x00[", b"PK\x03\x04" + b"\0" * 40])
def test_non_safetensors_headers_are_refused(content, tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnsafeWeightsError):
        check_safetensors_header("m", path)
    check_safetensors_header("m", _tiny_safetensors(tmp_path / "ok.safetensors"))  # a real one passes


def test_corrupt_or_wrong_safetensors_is_a_mismatch(tmp_path) -> None:
    net = create_arch("cifar_resnet20", shortcut="pad_end")
    save_file(net.state_dict(), str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _tiny_safetensors(tmp_path / "other.safetensors")
    registry = tmp_path / "r.toml"
    registry.write_text(
        '[models.cut]\narch = "cifar_resnet20"\nsource = "cut.safetensors"\n'
        '[models.other]\narch = "cifar_resnet20"\nsource = "other.safetensors"\n'
    )
    with pytest.raises(UnsafeWeightsError, match="not a readable safetensors file") as info:  # damaged, not "mismatch"
        load_model("cut", registry=[registry])
    assert str(tmp_path / "cut.safetensors") in str(info.value) and "convert" not in str(info.value)
    with pytest.raises(WeightsMismatchError) as info:
        load_model("other", registry=[registry])
    assert "'other'" in str(info.value) and "do not fit" in str(info.value)
    # a float parameter stored as integers, of the right shape: it was cast without a word
    state = {k: v.long() if k == "fc.weight" else v for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "ints.safetensors"))
    registry.write_text('[models.ints]\narch = "cifar_resnet20"\narch_args = { shortcut = "pad_end" }\n'
                        'source = "ints.safetensors"\n')  # fmt: skip
    with pytest.raises(WeightsMismatchError, match="'fc.weight': file torch.int64"):
        load_model("ints", registry=[registry])


@pytest.mark.parametrize(("dtype", "said"), [
    (torch.complex64, "1 float tensor stored as complex numbers ('w': file torch.complex64)"),
    (torch.int64, "1 float tensor stored as integers ('w': file torch.int64)"),
    (torch.bool, "1 float tensor stored as booleans ('w': file torch.bool)"),
])  # fmt: skip
def test_a_float_tensor_of_another_dtype_is_named_by_its_dtype(dtype, said) -> None:
    """complex64 weights were said to be 'float tensors stored as integers'. (The function is called directly:
    safetensors before 0.7, the floor's, cannot store complex64.)"""
    from preempt_cli.models._load import _state_mismatch

    assert _state_mismatch({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=dtype)}) == said
    mixed = _state_mismatch({"a": torch.zeros(2), "b": torch.zeros(2)},
                            {"a": torch.zeros(2, dtype=torch.complex64),
                             "b": torch.zeros(2, dtype=torch.int8)})  # fmt: skip
    assert "2 float tensors stored as other types than float" in mixed and "integers" not in mixed



@pytest.mark.parametrize(("key", "value", "said"), [
    ("fc.weight", float("nan"), "'fc.weight': 1 of 640 values NaN or inf"),
    ("conv1.weight", float("inf"), "'conv1.weight': 1 of 432 values NaN or inf"),
    ("bn1.running_var", float("nan"), "'bn1.running_var': 1 of 16 values NaN or inf"),
    ("bn1.running_var", -0.5, "'bn1.running_var': a negative variance (-0.5)"),
    ("fc.bias", 1e39, "'fc.bias': 1 of 10 values NaN or inf"),  # finite in float64, inf once loaded as float32
], ids=["nan", "inf", "nan-statistic", "negative-variance", "float64-overflow"])  # fmt: skip
def test_weights_holding_nan_inf_or_a_negative_variance_are_refused(tmp_path, key, value, said) -> None:
    """They loaded without a word and gave NaN gradients: protect wrote images perturbed by nothing useful
    and called them protected (a NaN in a BatchNorm statistic even passed 'models verify')."""
    from preempt_cli.errors import NonFiniteWeightsError

    state = {k: v.clone() for k, v in _random_resnet20(0).state_dict().items()}
    if value == 1e39:
        state[key] = state[key].double()
    state[key].view(-1)[0] = value
    save_file(state, str(tmp_path / "bad.safetensors"))
    cfg = ModelConfig(name="bad", arch="cifar_resnet20", arch_args={"shortcut": "pad_end"},
                      source=Source("file", str(tmp_path / "bad.safetensors")))  # fmt: skip
    with pytest.raises(NonFiniteWeightsError) as info:
        load_model(cfg)
    message = str(info.value)
    assert said in message and str(tmp_path / "bad.safetensors") in message and "\n" not in message
    assert isinstance(info.value, WeightsMismatchError)  # exit 2, as a file that does not fit
    state[key].view(-1)[0] = 1.0  # the same file with a plain value loads
    save_file(state, str(tmp_path / "bad.safetensors"))
    assert isinstance(load_model(cfg), ImageModel)


def test_a_timm_model_with_nan_weights_is_refused_but_not_for_its_other_buffers(hf_cache, tmp_path) -> None:
    import timm

    from preempt_cli.errors import NonFiniteWeightsError

    state = dict(timm.create_model("test_resnet", pretrained=False).state_dict())
    key = next(k for k, v in state.items() if k.endswith(".weight") and v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    make_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "model.safetensors", data)
    with pytest.raises(NonFiniteWeightsError, match=f"{key!r}: 1 of"):
        load_model(_timm_test_resnet_cfg())


def test_only_learned_tensors_are_checked_for_non_finite_values() -> None:
    """A buffer that is no parameter nor BatchNorm statistic may hold -inf on purpose (an attention mask)."""
    from preempt_cli.models._load import _learned_tensor_names, _unusable_values

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net.register_buffer("mask", torch.full((2,), float("-inf")))
    state = net.state_dict()
    learned = _learned_tensor_names(net)
    assert learned == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    assert _unusable_values(state, learned) == ""
    state["1.running_mean"] = torch.tensor([0.0, float("nan"), 0.0, float("inf")])
    assert _unusable_values(state, learned) == "'1.running_mean': 2 of 4 values NaN or inf"

# -- the Hugging Face cache, offline ---------------------------------------------------------------------------


@pytest.mark.parametrize("symlink", [True, False], ids=["symlink", "copy"])
@pytest.mark.parametrize("revision", [f"@{COMMIT}", "@main", ""], ids=["commit", "main", "default"])
def test_hf_source_loads_offline_from_the_cache(revision, symlink, hf_cache, tmp_path) -> None:
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    pointer = make_hf_cache(hf_cache, "org/tiny", "weights/model.safetensors", data, symlink=symlink)
    cfg = _hf_cfg(f"hf://org/tiny/weights/model.safetensors{revision}", sha256=hashlib.sha256(data).hexdigest())
    path = resolve_weights(cfg)
    assert Path(path) == pointer
    assert Path(path).read_bytes() == data


def test_hf_source_with_another_branch_and_commit(hf_cache, tmp_path) -> None:
    old = _tiny_safetensors(tmp_path / "old.safetensors", 1.0).read_bytes()
    new = _tiny_safetensors(tmp_path / "new.safetensors", 2.0).read_bytes()
    make_hf_cache(hf_cache, "org/tiny", "m.safetensors", old, commit=OTHER_COMMIT, refs=("v1",))
    make_hf_cache(hf_cache, "org/tiny", "m.safetensors", new, commit=COMMIT, refs=("main",))
    assert resolve_weights(_hf_cfg("hf://org/tiny/m.safetensors@v1")).read_bytes() == old
    assert resolve_weights(_hf_cfg(f"hf://org/tiny/m.safetensors@{OTHER_COMMIT}")).read_bytes() == old
    assert resolve_weights(_hf_cfg("hf://org/tiny/m.safetensors")).read_bytes() == new


def test_empty_cache_offline_says_what_to_do(hf_cache) -> None:
    cfg = _hf_cfg("hf://org/absent/model.safetensors@main")
    with pytest.raises(OfflineWeightsError) as info:
        resolve_weights(cfg)
    message = str(info.value)
    assert "'tiny-hf'" in message and "hf://org/absent/model.safetensors@main" in message
    assert "HF_HUB_OFFLINE" in message  # why, and what to unset
    assert "--registry" in message  # the other way out: a local file
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(OfflineWeightsError):
        resolve_weights(_hf_cfg(f"hf://org/absent/model.safetensors@{COMMIT}"))


def test_a_cache_entry_whose_blob_is_gone_is_called_damaged(hf_cache, tmp_path) -> None:
    # "not in the local Hugging Face cache" alone: the user looked for a download that was there
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    pointer = make_hf_cache(hf_cache, "org/tiny", "sub/model.safetensors", data)  # in a folder of the repo
    os.unlink(pointer.resolve())
    with pytest.raises(OfflineWeightsError) as info:
        resolve_weights(_hf_cfg("hf://org/tiny/sub/model.safetensors"))
    message = str(info.value)
    assert f"The cache holds a damaged entry: {pointer} links to " in message
    assert f"delete {hf_cache / 'models--org--tiny'} and download the weights again" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["header cut", "end cut", "bytes changed"])
def test_a_damaged_copy_in_the_hub_cache_names_the_folder_to_delete(hf_cache, tmp_path, damage: str) -> None:
    # huggingface_hub uses a cached file as it is, unchecked, whether online or not: "fetch or copy it
    # again" and "download it again" could not be followed, each run reading the same damaged bytes
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    pointer = make_hf_cache(hf_cache, "org/tiny", "m.safetensors", data)
    damaged = {"header cut": data[:20], "end cut": data[:-4], "bytes changed": data[:-1] + b"\x7f"}[damage]
    pointer.resolve().write_bytes(damaged)
    cfg = _hf_cfg(f"hf://org/tiny/m.safetensors@{COMMIT}", sha256=_sha(tmp_path / "src.safetensors"))
    if damage == "end cut":  # the header is whole: safetensors' parse finds it
        cfg = replace(cfg, sha256=None)
    with pytest.raises(UnsafeWeightsError if damage != "bytes changed" else HashMismatchError) as info:
        load_model(cfg)
    message = str(info.value)
    assert f"delete {hf_cache / 'models--org--tiny'}" in message, message
    assert "copy it again" not in message and "download it again, or fix the pin" not in message, message
    assert "\n" not in message


def test_an_unpinned_hub_cache_copy_changed_since_its_download_is_refused(hf_cache, tmp_path) -> None:
    # huggingface_hub names the blob by the sha256 it served and uses it unchecked: without a pin, a copy
    # changed since (one weight's byte) was loaded as the model, without a word
    save_file(_random_resnet20(0).state_dict(), str(tmp_path / "r20.safetensors"))
    data = (tmp_path / "r20.safetensors").read_bytes()
    pointer = make_hf_cache(hf_cache, "org/r20", "r20.safetensors", data)
    cfg = ModelConfig(name="r20", arch="cifar_resnet20", arch_args={"shortcut": "pad_end"},
                      source=Source("hf", "org/r20", "r20.safetensors", COMMIT))  # fmt: skip
    assert load_model(cfg).weights_sha256 == hashlib.sha256(data).hexdigest()  # the intact copy loads
    pointer.resolve().write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UnreadableWeightsError) as info:
        load_model(cfg)
    message = str(info.value)
    assert f"not the {hashlib.sha256(data).hexdigest()} of the file the Hub served" in message, message
    assert f"delete {hf_cache / 'models--org--r20'}" in message and "\n" not in message
    assert isinstance(load_model(cfg, verify_hash=False), ImageModel)  # the way past it, as for a pin


def test_a_pin_that_the_hub_cache_copy_does_not_match_but_is_intact_is_not_called_damaged(hf_cache, tmp_path) -> None:
    # the blob is named by the sha256 the Hub gave: the copy is what the commit holds, so the pin is wrong
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    make_hf_cache(hf_cache, "org/tiny", "m.safetensors", data)
    with pytest.raises(HashMismatchError) as info:
        resolve_weights(_hf_cfg(f"hf://org/tiny/m.safetensors@{COMMIT}", sha256="b" * 64))
    assert "delete" not in str(info.value)


def test_offline_cache_without_the_requested_file(hf_cache, tmp_path) -> None:
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    make_hf_cache(hf_cache, "org/tiny", "a.safetensors", data)
    with pytest.raises(OfflineWeightsError):
        resolve_weights(_hf_cfg("hf://org/tiny/b.safetensors@main"))


def test_hf_pickle_and_pin_mismatch_are_refused(hf_cache, tmp_path, monkeypatch) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "ckpt.bin")
    make_hf_cache(hf_cache, "org/pickled", "model.bin", (tmp_path / "ckpt.bin").read_bytes())
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(UnsafeWeightsError):
        resolve_weights(_hf_cfg("hf://org/pickled/model.bin"))
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    make_hf_cache(hf_cache, "org/tiny", "m.safetensors", data)
    with pytest.raises(HashMismatchError):
        resolve_weights(_hf_cfg("hf://org/tiny/m.safetensors", sha256="b" * 64))


# -- load_model end to end ------------------------------------------------------------------------------------


def _random_resnet20(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_load_model_from_hf_cache_matches_the_saved_net(revision, hf_cache, tmp_path) -> None:
    net = _random_resnet20(0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r20.safetensors"))
    data = (tmp_path / "r20.safetensors").read_bytes()
    make_hf_cache(hf_cache, "someone/tiny-r20", "r20.safetensors", data)
    digest = hashlib.sha256(data).hexdigest()
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f"""
[models.tiny-r20]
arch = "cifar_resnet20"
arch_args = {{ shortcut = "pad_end" }}
dataset = "cifar10"
input_size = [3, 32, 32]
mean = {list(MEAN)}
std = {list(STD)}
classes = "cifar10"
source = "hf://someone/tiny-r20/r20.safetensors@{revision}"
sha256 = "{digest}"
role = "backbone"
"""
    )
    model = load_model("tiny-r20", registry=[registry])
    assert isinstance(model, ImageModel)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert model.weights_sha256 == digest and model.name == "tiny-r20"
    assert model.config.classes[3] == "cat"  # class set from the built-in registry

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - mean) / std)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.01  # the comparison is not between two constants

    # Weights really came from the file: another random net disagrees.
    other = _random_resnet20(1)
    with torch.no_grad():
        assert not torch.allclose(other((x - mean) / std), got, atol=1e-3)

    # The wrapper resizes other sizes (before normalizing) and repeats grayscale to RGB.
    flat_small = torch.full((2, 3, 32, 32), 0.3)
    flat_small[1] = torch.tensor([0.9, 0.1, 0.5]).view(3, 1, 1)
    flat_big = torch.nn.functional.interpolate(flat_small, size=(48, 80), mode="nearest")
    gray = x[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(model(flat_big), model(flat_small), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(gray), net((gray.expand(-1, 3, -1, -1) - mean) / std), atol=1e-5, rtol=1e-5)


def test_load_model_local_file_with_models_dir(tmp_path) -> None:
    net = _random_resnet20(3)
    (tmp_path / "models").mkdir()
    save_file(net.state_dict(), str(tmp_path / "models" / "k.safetensors"))
    registry = tmp_path / "r.toml"
    registry.write_text(
        '[models.k]\narch = "cifar_resnet20"\narch_args = { shortcut = "pad_end" }\nsource = "file:k.safetensors"\n'
    )
    model = load_model("k", registry=[registry], models_dir=tmp_path / "models")
    assert model.weights_sha256 == _sha(tmp_path / "models" / "k.safetensors")  # computed when not pinned
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
    # A config object works as well as a name.
    cfg = get_model_config("k", [registry])
    assert isinstance(load_model(cfg, models_dir=str(tmp_path / "models")), ImageModel)


# -- the bytes hashed are the bytes loaded ----------------------------------------------------------------------


def _pinned_resnet20(tmp_path: Path) -> tuple[torch.nn.Module, Path, Path, str]:
    """A resnet20's weights in ``k.safetensors`` and a registry row pinning them: (net, weights, registry, pin)."""
    good = _random_resnet20(0)
    path = tmp_path / "k.safetensors"
    save_file(good.state_dict(), str(path))
    pin = _sha(path)
    registry = tmp_path / "r.toml"
    registry.write_text(f'[models.k]\narch = "cifar_resnet20"\narch_args = {{ shortcut = "pad_end" }}\n'
                        f'source = "file:k.safetensors"\nsha256 = "{pin}"\n')  # fmt: skip
    return good, path, registry, pin


def _before_parsing(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Call ``change()`` after the weights file was hashed, as safetensors is about to parse it."""
    import safetensors
    import safetensors.torch

    def changing(real):
        def parse(*args, **kwargs):
            change()
            return real(*args, **kwargs)

        return parse

    for module, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "load")):
        monkeypatch.setattr(module, name, changing(getattr(module, name)))


def test_weights_replaced_after_hashing_are_not_loaded(tmp_path, monkeypatch) -> None:
    """The file is replaced between the pin check and the load (a download or ``cp`` to a temporary name,
    then renamed over it): the model holds the weights that were checked, and its sha256 describes them."""
    good, path, registry, pin = _pinned_resnet20(tmp_path)
    save_file(_random_resnet20(1).state_dict(), str(tmp_path / "evil.safetensors"))
    _before_parsing(monkeypatch, lambda: os.replace(tmp_path / "evil.safetensors", path))
    model = load_model("k", registry=[registry], fuse=False)
    assert _sha(path) != pin  # the swap did happen
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), good(x), atol=1e-5, rtol=1e-5)
    assert model.weights_sha256 == pin
    assert model.pin_verified and model.weights_path == str(path)


def test_weights_written_in_place_after_hashing_are_refused(tmp_path, monkeypatch) -> None:
    """The file is written over in place between the pin check and the load (``cp`` onto it): the tensors are
    mapped from the file, not read into memory, so what they hold is no longer what was hashed; the load is
    refused, not given weights other than those its sha256 names."""
    _, path, registry, _ = _pinned_resnet20(tmp_path)
    save_file(_random_resnet20(1).state_dict(), str(tmp_path / "evil.safetensors"), metadata={"by": "someone else"})
    evil = (tmp_path / "evil.safetensors").read_bytes()
    inode = path.stat().st_ino

    def write_in_place() -> None:
        with path.open("r+b") as f:  # the same file, not a new one renamed over it
            f.write(evil)
        assert path.stat().st_ino == inode

    _before_parsing(monkeypatch, write_in_place)
    with pytest.raises(UnreadableWeightsError, match=r"'k' .*written to while it was being loaded.*run again"):
        load_model("k", registry=[registry], fuse=False)


def test_load_model_does_not_read_the_weights_file_into_memory(tmp_path) -> None:
    """The file was read whole into a bytes object (to hash it, then parse it) and parsed into a second copy,
    on top of the net's own weights: a model took three times its size to load. It is hashed in chunks, and
    its tensors mapped from the file. Python's own allocations are traced (a bytes object is one; the tensors'
    memory is not): their peak stays far below the file's size."""
    import tracemalloc

    net = create_arch("resnet18_cifar", num_classes=10)  # 44 MB of weights: far above the 1 MiB of a hash's chunk
    path = tmp_path / "r18.safetensors"
    save_file(net.state_dict(), str(path))
    cfg = ModelConfig(name="r18", arch="resnet18_cifar", source=Source("file", str(path)), sha256=_sha(path))
    tracemalloc.start()
    try:
        model = load_model(cfg, fuse=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model.pin_verified
    assert peak < path.stat().st_size / 4, f"{peak} bytes allocated by Python for a {path.stat().st_size}-byte file"


def test_weights_sha256_of_an_unpinned_file_describes_the_loaded_bytes(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    import preempt_cli.hub as hub

    net = _random_resnet20(2)
    path = tmp_path / "k.safetensors"
    save_file(net.state_dict(), str(path))
    digest = _sha(path)
    monkeypatch.setattr(hub, "sha256_file", lambda *a, **k: pytest.fail("the file was hashed separately"))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("the file was opened again"))
    model = load_model(ModelConfig(name="k", arch="cifar_resnet20", arch_args={"shortcut": "pad_end"},
                                   source=Source("file", str(path))))  # fmt: skip
    assert model.weights_sha256 == digest and not model.pin_verified


# -- Hub errors: one line, the source as written ---------------------------------------------------------------


def _http_error(cls, status: int, message: str = "Client Error"):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/org/repo/resolve/main/f"))
    return cls(f"{status} {message}\n\nRequest ID: abc\nmore lines", response=response)


def _hub_failures():
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return {
        "private-401": (lambda: _http_error(RepositoryNotFoundError, 401), WeightsNotFoundError, "HF_TOKEN"),
        "gated": (lambda: _http_error(GatedRepoError, 401), WeightsNotFoundError, "gated"),
        "forbidden-403": (lambda: _http_error(HfHubHTTPError, 403), WeightsNotFoundError, "HTTP 403"),
        "server-500": (lambda: _http_error(HfHubHTTPError, 500, "Server Error"), OfflineWeightsError, "HTTP 500"),
        "revision": (lambda: _http_error(RevisionNotFoundError, 404), WeightsNotFoundError, "no revision 'v9'"),
        "entry": (lambda: _http_error(RemoteEntryNotFoundError, 404), WeightsNotFoundError, "no such file"),
        "proxy": (lambda: httpx2.ProxyError("407 Proxy Authentication Required"), OfflineWeightsError, "ProxyError"),
        "connect": (lambda: httpx2.ConnectError("connection refused"), OfflineWeightsError, "cannot be reached"),
        "bad-repo-id": (lambda: HFValidationError("Repo id must use alphanumeric chars"), RegistryError,
                        "not a valid Hub source"),  # fmt: skip
    }


@pytest.mark.parametrize("case", ["private-401", "gated", "forbidden-403", "server-500", "revision", "entry", "proxy",
                                  "connect", "bad-repo-id"])  # fmt: skip
def test_hub_errors_are_one_line_naming_model_and_source(case, monkeypatch) -> None:
    import huggingface_hub

    make, expected, words = _hub_failures()[case]

    def failing(*args, **kwargs):
        raise make()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    cfg = _hf_cfg("hf://org/repo/sub/model.safetensors@v9")
    with pytest.raises(expected) as info:
        load_model(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    assert "'tiny-hf'" in message and "hf://org/repo/sub/model.safetensors@v9" in message, message
    assert words in message, message
    assert isinstance(info.value, PreemptError)


@pytest.mark.parametrize("case", ["private-401", "revision", "proxy", "server-500"])
def test_timm_hub_errors_are_one_line(case, monkeypatch) -> None:
    import huggingface_hub

    make, expected, words = _hub_failures()[case]

    def failing(*args, **kwargs):
        raise make()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)  # the safetensors of timm's Hub repository
    cfg = ModelConfig(name="tv", arch="resnet18", source=Source("timm", "resnet18.a1_in1k"), num_classes=1000,
                      input_size=(3, 224, 224))  # fmt: skip
    with pytest.raises(expected) as info:
        load_model(cfg)
    message = str(info.value)
    assert "\n" not in message and "'tv'" in message and "timm:resnet18.a1_in1k" in message, message


def test_hash_mismatch_on_a_moving_revision_says_upstream_may_have_changed(hf_cache, tmp_path) -> None:
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    make_hf_cache(hf_cache, "org/tiny", "m.safetensors", data)
    with pytest.raises(HashMismatchError, match="may have changed upstream") as info:
        resolve_weights(_hf_cfg("hf://org/tiny/m.safetensors", sha256="b" * 64))
    assert "main branch" in str(info.value)
    with pytest.raises(HashMismatchError) as info:
        resolve_weights(_hf_cfg(f"hf://org/tiny/m.safetensors@{COMMIT}", sha256="b" * 64))
    assert "upstream" not in str(info.value) and "corrupt" in str(info.value)


# -- timm rows -------------------------------------------------------------------------------------------------


def test_timm_pin_is_refused_not_ignored(monkeypatch) -> None:
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("loaded with an unchecked pin"))
    cfg = ModelConfig(name="tv", arch="resnet18", source=Source("timm", "resnet18.a1_in1k"), num_classes=1000,
                      sha256="a" * 64)  # fmt: skip
    with pytest.raises(PreemptError, match="cannot be checked on a timm"):
        load_model(cfg)


def test_timm_num_classes_other_than_the_pretrained_head_is_refused(tmp_path, monkeypatch) -> None:
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a random head was built"))
    registry = tmp_path / "r.toml"
    registry.write_text('[models.r18-10]\narch = "resnet18"\nsource = "timm:resnet18.a1_in1k"\nnum_classes = 10\n')
    with pytest.raises(RegistryError) as info:
        load_model("r18-10", registry=[registry])
    message = str(info.value)
    assert str(registry) in message and "'r18-10'" in message and "1000 classes" in message, message


# -- rows the architecture rejects ---------------------------------------------------------------------------------


def test_arch_args_the_builder_rejects_are_registry_errors(tmp_path) -> None:
    save_file(create_arch("cifar_resnet20").state_dict(), str(tmp_path / "w.safetensors"))
    registry = tmp_path / "r.toml"
    registry.write_text('[models.typo]\narch = "cifar_resnet20"\narch_args = { shortcutt = "pad_end" }\n'
                        'source = "w.safetensors"\n'
                        '[models.badvalue]\narch = "cifar_resnet20"\narch_args = { shortcut = "zeros" }\n'
                        'source = "w.safetensors"\n'
                        '[models.timmtypo]\narch = "resnet18"\narch_args = { colour = 1 }\nsource = "w.safetensors"\n')  # fmt: skip
    for name in ("typo", "badvalue", "timmtypo"):
        with pytest.raises(RegistryError) as info:
            load_model(name, registry=[registry])
        message = str(info.value)
        assert str(registry) in message and f"'{name}'" in message and "rejects arch_args" in message, message


def test_models_verify_reports_each_model_and_goes_on(tmp_path) -> None:
    from typer.testing import CliRunner

    from preempt_cli.cli import app

    net = _random_resnet20(0)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    pin = _sha(tmp_path / "w.safetensors")
    registry = tmp_path / "r.toml"
    rows = 'arch = "cifar_resnet20"\narch_args = { shortcut = "pad_end" }\nsource = "w.safetensors"\n'
    registry.write_text(f"[models.pinned]\n{rows}sha256 = \"{pin}\"\n[models.unpinned]\n{rows}"
                        '[models.typo]\narch = "cifar_resnet20"\narch_args = { shortcutt = 1 }\nsource = "w.safetensors"\n')  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, ["models", "verify", "typo", "pinned", "unpinned", "--registry", str(registry)])
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output
    assert "typo" in result.stderr and "rejects arch_args" in result.stderr
    assert "ok  pinned" in result.stdout and "sha256 matches pin" in result.stdout
    unpinned = next(line for line in result.stdout.splitlines() if "unpinned" in line)
    assert "no sha256 pin" in unpinned and "matches" not in unpinned
    result = runner.invoke(app, ["models", "verify", "pinned", "unpinned", "--registry", str(registry), "--json"])
    import json

    rows_out = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows_out["pinned"]["pinned"] is True and rows_out["pinned"]["sha256"] == pin
    assert rows_out["unpinned"]["pinned"] is False and rows_out["unpinned"]["weights"] == str(tmp_path / "w.safetensors")


# -- writing safetensors ------------------------------------------------------------------------------------------


def test_convert_keeps_tied_weights(tmp_path) -> None:
    from preempt_cli.convert import convert_checkpoint
    from safetensors.torch import load_file

    shared = torch.arange(6.0).view(2, 3)
    state = {"module.embed.weight": shared, "module.head.weight": shared, "module.half": shared[0]}
    torch.save({"state_dict": state}, tmp_path / "tied.pt")
    n, sha = convert_checkpoint(tmp_path / "tied.pt", tmp_path / "tied.safetensors")
    loaded = load_file(str(tmp_path / "tied.safetensors"))
    assert n == 3 and set(loaded) == {"embed.weight", "head.weight", "half"}
    torch.testing.assert_close(loaded["head.weight"], shared)
    torch.testing.assert_close(loaded["half"], shared[0])
    assert sha == _sha(tmp_path / "tied.safetensors")


def test_convert_refuses_keys_that_collide_once_stripped(tmp_path) -> None:
    from preempt_cli.convert import convert_checkpoint
    from preempt_cli.errors import ConfigError

    torch.save({"module.fc.weight": torch.zeros(2), "fc.weight": torch.ones(2)}, tmp_path / "c.pt")
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(tmp_path / "c.pt", tmp_path / "c.safetensors")
    message = str(info.value)
    assert "'module.fc.weight'" in message and "'fc.weight'" in message and str(tmp_path / "c.pt") in message
    assert not (tmp_path / "c.safetensors").exists()


def test_save_safetensors_syncs_before_renaming_and_gives_normal_permissions(tmp_path, monkeypatch) -> None:
    import preempt_cli.hub as hub
    from preempt_cli.hub import save_safetensors

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(hub.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(hub.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    old = os.umask(0o027)
    try:
        save_safetensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert events[:2] == ["fsync", "replace"], events
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_hand_made_config_with_mean_for_other_channels_is_a_config_error() -> None:
    from preempt_cli.errors import ConfigError

    net = create_arch("cifar_resnet20")
    cfg = ModelConfig(name="gray", arch="cifar_resnet20", source=Source("file", "w.safetensors"),
                      input_size=(3, 32, 32), mean=(0.5,), std=(0.5,))  # fmt: skip
    with pytest.raises(ConfigError, match="'gray'.*one per input channel"):
        ImageModel(net, cfg)


def test_save_safetensors_writes_the_same_bytes_for_the_same_content(tmp_path) -> None:
    # safetensors writes its metadata in a hash map's order: identical trainings gave files of other sha256
    from safetensors import safe_open

    from preempt_cli.hub import save_safetensors

    tensors = {"conv.weight": torch.arange(24.0).reshape(2, 3, 4), "fc.bias": torch.ones(5, dtype=torch.bfloat16)}
    metadata = {f"key{i}": f"value {i}" for i in range(12)}
    digests = set()
    for i in range(8):
        order = dict(reversed(list(metadata.items()))) if i % 2 else metadata
        save_safetensors(tensors, tmp_path / f"m{i}.safetensors", order)
        digests.add(hashlib.sha256((tmp_path / f"m{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "m0.safetensors"), framework="pt") as f:  # still a valid file
        assert f.metadata() == metadata
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    assert int.from_bytes((tmp_path / "m0.safetensors").read_bytes()[:8], "little") % 8 == 0


def _timm_test_resnet_cfg() -> ModelConfig:
    return ModelConfig(name="tr", arch="test_resnet", source=Source("timm", "test_resnet.r160_in1k"), num_classes=1000,
                       input_size=(3, 160, 160))  # fmt: skip


def test_timm_weights_load_from_the_hub_repositorys_safetensors(hf_cache, tmp_path) -> None:
    import timm

    reference = timm.create_model("test_resnet", pretrained=False)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    state = {k: v.abs() if k.endswith("running_var") else v for k, v in state.items()}  # a variance is >= 0
    save_file(state, str(tmp_path / "w.safetensors"))
    make_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "model.safetensors", (tmp_path / "w.safetensors").read_bytes())
    model = load_model(_timm_test_resnet_cfg(), fuse=False)
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in state.items() if k in loaded)


def test_timm_weights_changed_in_the_cache_since_their_download_are_refused(hf_cache, tmp_path) -> None:
    # as for an hf:// source: huggingface_hub uses a cached copy unchecked, and a timm: row cannot be pinned,
    # so a copy changed since its download (one weight's byte) was loaded as timm's model without a word
    import timm

    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    pointer = make_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "model.safetensors", data)
    load_model(_timm_test_resnet_cfg(), fuse=False)  # the intact copy loads
    pointer.resolve().write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UnreadableWeightsError) as info:
        load_model(_timm_test_resnet_cfg(), fuse=False)
    message = str(info.value)
    assert "'tr'" in message and f"not the {hashlib.sha256(data).hexdigest()} of the file the Hub served" in message
    assert f"delete {hf_cache / 'models--timm--test_resnet.r160_in1k'}" in message and "\n" not in message
    load_model(_timm_test_resnet_cfg(), fuse=False, verify_hash=False)  # the way past it, as for an hf:// source


def test_timm_weights_that_are_only_a_pickle_are_refused_unread(hf_cache, tmp_path, monkeypatch) -> None:
    """timm falls back to ``pytorch_model.bin`` (a pickle) where a repository has no safetensors; preempt
    loads safetensors only, as its README says."""
    import huggingface_hub
    import timm
    from huggingface_hub.errors import RemoteEntryNotFoundError

    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    make_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "pytorch_model.bin", (tmp_path / "pytorch_model.bin").read_bytes())
    # offline with no safetensors cached: unreachable, not a pickle loaded
    with pytest.raises(OfflineWeightsError):
        load_model(_timm_test_resnet_cfg())
    # online, the repository answers that it has no model.safetensors
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: (_ for _ in ()).throw(_http_error(RemoteEntryNotFoundError, 404)))  # fmt: skip
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was left to find the weights"))
    with pytest.raises(WeightsNotFoundError, match="no model.safetensors.*safetensors only"):
        load_model(_timm_test_resnet_cfg())


def test_an_unknown_timm_tag_is_a_registry_error_not_timms_runtime_error() -> None:
    cfg = ModelConfig(name="tbad", arch="test_vit", source=Source("timm", "test_vit.nosuchtag"), num_classes=1000,
                      input_size=(3, 160, 160))  # fmt: skip
    with pytest.raises(PreemptError, match="no pretrained weights 'test_vit.nosuchtag'"):
        load_model(cfg)


def test_a_cached_model_is_used_when_a_proxy_refuses_the_hub(tmp_path, monkeypatch, caplog) -> None:
    """huggingface_hub re-raises a proxy's refusal instead of falling back to its cache: a model whose
    weights were all cached failed, said to be "not in the local Hugging Face cache"."""
    import logging

    import httpx2
    import huggingface_hub

    cache = tmp_path / "hf" / "hub"
    data = _tiny_safetensors(tmp_path / "src.safetensors").read_bytes()
    make_hf_cache(cache, "org/tiny", "m.safetensors", data)
    set_hf_cache(monkeypatch, cache, offline=False)
    real = huggingface_hub.hf_hub_download

    def behind_a_proxy(*args, **kwargs):
        if not kwargs.get("local_files_only"):  # a proxy answers 403 to every request (no network is used)
            raise httpx2.ProxyError("403 Forbidden")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", behind_a_proxy)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", behind_a_proxy)  # preempt's one request first
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        path = resolve_weights(_hf_cfg("hf://org/tiny/m.safetensors"))
    assert path.read_bytes() == data
    assert any("cannot be reached" in r.getMessage() and "cached copy" in r.getMessage() for r in caplog.records)
    with pytest.raises(OfflineWeightsError, match="ProxyError"):  # not cached: the proxy's refusal is the reason
        resolve_weights(_hf_cfg("hf://org/other/m.safetensors"))


def test_a_pin_in_capitals_matches(tmp_path) -> None:
    """A hand-made ``ModelConfig(sha256=...)`` in capitals failed, showing the same hash twice."""
    from preempt_cli.hub import verified_weights

    weights = _tiny_safetensors(tmp_path / "w.safetensors")
    with verified_weights(replace(_cfg(str(weights)), sha256=_sha(weights).upper())) as verified:
        assert verified.sha256 == _sha(weights)


def test_a_timm_source_builds_timms_model_or_is_refused(tmp_path, hf_cache) -> None:
    """An arch of preempt's own on a timm: row was built instead of timm's model, with random weights that
    `models verify` called ok; another timm name was ignored. Both are refused, in a registry file and in a
    config made by hand."""
    registry = tmp_path / "models.toml"
    for arch in ("cifar_resnet20", "resnet18"):
        registry.write_text(f'[models.t2]\narch = "{arch}"\nsource = "timm:test_resnet.r160_in1k"\n')
        with pytest.raises(RegistryError, match=f"loads timm's 'test_resnet': arch must be 'test_resnet', not '{arch}'"):
            get_model_config("t2", [registry])
        with pytest.raises(ConfigError, match="arch must be 'test_resnet'"):
            load_model(replace(_timm_test_resnet_cfg(), arch=arch))
    for arch in ("test_resnet", "test_resnet.r160_in1k"):  # the model, with or without the tag
        registry.write_text(f'[models.t2]\narch = "{arch}"\nsource = "timm:test_resnet.r160_in1k"\n')
        assert get_model_config("t2", [registry]).arch == arch


@pytest.mark.parametrize("damage", ["pickle", "truncated", "other keys"])
def test_a_damaged_timm_file_in_the_cache_is_refused_in_one_line(hf_cache, tmp_path, damage: str) -> None:
    """What a file: or hf:// source gets: a pickle refused unread, with the way to convert it; a damaged
    file or one of another net in a line, not safetensors' or torch's own errors (kilobytes of keys)."""
    import timm

    path = tmp_path / "model.safetensors"
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    if damage == "pickle":
        torch.save(state, path)
    elif damage == "truncated":
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    else:
        save_file({f"other.{k}": v.contiguous() for k, v in state.items()}, str(path))
    make_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "model.safetensors", path.read_bytes())
    expected = {"pickle": UnsafeWeightsError, "truncated": UnreadableWeightsError, "other keys": WeightsMismatchError}
    with pytest.raises(expected[damage]) as info:
        load_model(_timm_test_resnet_cfg())
    assert "\n" not in str(info.value) and len(str(info.value)) < 700
    if damage == "pickle":
        assert "preempt models convert" in str(info.value)


_SAVED_FOR = {"arch": "cifar_resnet20", "shortcut": "pad_end", "mean": "none", "std": "none", "input_size": "32",
              "num_classes": "10", "dataset": "cifar10",
              "classes": "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"}  # as the shared files  # fmt: skip


@pytest.mark.parametrize(
    "row, said",
    [
        # the natural row for a robust ResNet-20 file: the standard one's base, whose shortcut and ImageNet
        # normalization it inherits (15.5% clean accuracy instead of 86.5, and `verify` said ok)
        ('base = "cifar10-resnet20-std"', ["arch_args.shortcut 'pad_end' in the file, 'pad_both' in the row",
                                           "mean none in the file, [0.485, 0.456, 0.406] in the row"]),
        ('base = "cifar10-resnet20-pgdat-a"\nclasses = ["truck", "ship", "horse", "frog", "dog", "deer", "cat", '
         '"bird", "automobile", "airplane"]', ["classes [airplane, automobile, bird, ... (10)] in the file"]),
        ('base = "cifar10-resnet20-pgdat-a"\ninput_size = 64', ["input_size [32] in the file, [64] in the row"]),
        ('base = "cifar10-resnet20-pgdat-a"\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]',
         ["mean none in the file, [0.5, 0.5, 0.5] in the row"]),
    ],
    ids=["shortcut-and-normalization", "class-order", "input-size", "normalization"],
)
def test_weights_whose_own_metadata_contradicts_their_row_are_refused(tmp_path, row, said) -> None:
    from preempt_cli.errors import WeightsMetadataMismatchError

    net = create_arch("cifar_resnet20", shortcut="pad_end")
    save_file(net.state_dict(), str(tmp_path / "k.safetensors"), metadata=_SAVED_FOR)
    registry = tmp_path / "r.toml"
    registry.write_text(f'[models.k]\n{row}\nsource = "file:k.safetensors"\n')
    with pytest.raises(WeightsMetadataMismatchError) as info:
        load_model("k", registry=registry)
    assert all(s in str(info.value) for s in said), str(info.value)
    assert "were saved for another registry row" in str(info.value) and isinstance(info.value, WeightsMismatchError)
    # the row that matches loads, written in other forms (input_size as [C, H, W], the dataset's spelling)
    registry.write_text('[models.k]\nbase = "cifar10-resnet20-pgdat-a"\ninput_size = [3, 32, 32]\n'
                        'dataset = "CIFAR-10"\nsource = "file:k.safetensors"\n')  # fmt: skip
    assert load_model("k", registry=registry).config.arch_args["shortcut"] == "pad_end"


def test_another_dataset_name_is_said_and_arch_args_compare_as_json(tmp_path, caplog) -> None:
    import logging

    # a dataset is a name (CIFAR-10 weights evaluated on CIFAR-10-C): a warning, not a refusal
    net = create_arch("cifar_resnet20", shortcut="pad_end")
    save_file(net.state_dict(), str(tmp_path / "k.safetensors"), metadata=_SAVED_FOR)
    registry = tmp_path / "r.toml"
    registry.write_text('[models.k]\nbase = "cifar10-resnet20-pgdat-a"\ndataset = "cifar10-c"\nsource = "file:k.safetensors"\n')
    with caplog.at_level(logging.WARNING):
        assert load_model("k", registry=registry).config.dataset == "cifar10-c"
    assert "saved for dataset 'cifar10', its registry row says 'cifar10-c'" in caplog.text
    # a recorded list against the architecture's default tuple (dm_* mean and std): the same values
    from preempt_cli.models.dm_resnet import CIFAR10_MEAN

    dm = create_arch("dm_preact_resnet18", activation="silu")
    save_file(dm.state_dict(), str(tmp_path / "dm.safetensors"),
              metadata={"arch": "dm_preact_resnet18", "arch_args": json.dumps({"activation": "silu", "mean": list(CIFAR10_MEAN)})})  # fmt: skip
    registry.write_text('[models.dm]\narch = "dm_preact_resnet18"\narch_args = { activation = "silu" }\n'
                        'source = "file:dm.safetensors"\n')  # fmt: skip
    assert load_model("dm", registry=registry).config.arch == "dm_preact_resnet18"


def test_metadata_another_tool_wrote_is_left_alone(tmp_path) -> None:
    # only what preempt's files record, in their forms: a third party's "arch" or "mean" prose is no claim
    net = create_arch("cifar_resnet20", shortcut="pad_end")
    save_file(net.state_dict(), str(tmp_path / "k.safetensors"),
              metadata={"format": "pt", "arch": "ResNet-20 (PNI)", "mean": "per-channel", "classes": ""})  # fmt: skip
    registry = tmp_path / "r.toml"
    registry.write_text('[models.k]\nbase = "cifar10-resnet20-pgdat-a"\nsource = "file:k.safetensors"\n')
    assert load_model("k", registry=registry).name == "k"


def test_a_mean_and_std_for_a_net_that_normalizes_itself_are_refused(tmp_path) -> None:
    # dm_* nets hold their normalization as buffers: the wrapper's would normalize twice, silently
    from preempt_cli.errors import RegistryError
    from preempt_cli.models import build_model

    registry = tmp_path / "r.toml"
    registry.write_text('[models.p]\narch = "dm_preact_resnet18"\nmean = [0.5, 0.5, 0.5]\nstd = [0.2, 0.2, 0.2]\n'
                        'source = "file:p.safetensors"\n')  # fmt: skip
    with pytest.raises(RegistryError, match='normalizes its input itself .*set mean = "none"'):
        build_model(get_model_config("p", registry))


def test_class_names_holding_commas_match_the_files_joined_list(tmp_path) -> None:
    # preempt train joins class names with commas: a folder named "boots, rubber" must still load
    net = create_arch("cifar_resnet20", num_classes=3, shortcut="pad_end")
    names = ["boots, rubber", "hats", "socks"]
    save_file(net.state_dict(), str(tmp_path / "k.safetensors"),
              metadata={"arch": "cifar_resnet20", "num_classes": "3", "classes": ",".join(names)})  # fmt: skip
    registry = tmp_path / "r.toml"
    registry.write_text('[models.k]\narch = "cifar_resnet20"\narch_args = { shortcut = "pad_end" }\nnum_classes = 3\n'
                        f'classes = {names!r}\nsource = "file:k.safetensors"\n'.replace("'", '"'))  # fmt: skip
    assert load_model("k", registry=registry).config.classes == tuple(names)


def test_save_safetensors_holds_no_copy_of_the_file_beside_safetensors_own(tmp_path) -> None:
    """The sorted header was joined to a slice of safetensors' bytes: two more copies of the whole file at once
    beside safetensors' own, 4.4 GB beyond the weights for the WRN-94-16 (1.46 GB) that README says to convert.
    What safetensors' ``save`` holds itself depends on its version (one copy in 0.8, two in 0.4): only what
    writing the file adds to that is ours."""
    import tracemalloc

    from safetensors.torch import save

    from preempt_cli.hub import save_safetensors

    tensors = {"w": torch.zeros(2**21)}  # 8 MiB

    def peak_of(write) -> int:
        tracemalloc.start()
        try:
            write()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    own = peak_of(lambda: save(tensors, metadata={"converted_from": "w.pt"}))
    peak = peak_of(lambda: save_safetensors(tensors, tmp_path / "w.safetensors", {"converted_from": "w.pt"}))
    size = (tmp_path / "w.safetensors").stat().st_size
    assert peak < own + 0.5 * size, (peak, own, size)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], tensors["w"])
