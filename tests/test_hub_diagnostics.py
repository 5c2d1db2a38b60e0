"""What preempt says about weights that cannot be used: damaged files (not "a pickle"), architecture
mismatches in one short line, an input_size the architecture cannot take, the Hub out of reach."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

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
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", _unreachable)  # preempt's one request first
    cfg = ModelConfig(name="h", arch="cifar_resnet20", source=parse_source("hf://org/repo/m.safetensors"))
    with pytest.raises(OfflineWeightsError) as info:
        load_model(cfg)
    message = str(info.value)
    assert "\n" not in message and "hf://org/repo/m.safetensors" in message and "--registry" in message
    if offline:
        assert "unset HF_HUB_OFFLINE" in message
    else:
        assert "unset HF_HUB_OFFLINE" not in message, message  # it is not set: nothing to unset
        assert "Name or service not known" in message and "network" in message, message


def test_a_header_length_that_looks_like_a_pickle_opcode_is_still_safetensors(tmp_path) -> None:
    import json

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x280 - len(header))  # length 0x280: the file starts 80 02, as a pickle (PROTO 2) does
    path = tmp_path / "w.safetensors"
    path.write_bytes((0x280).to_bytes(8, "little") + header + b"\0\0\0\0")
    check_safetensors_header("m", path)


# -- the Hub out of reach, for real: a stand-in endpoint on this machine -------------------------------------

_RESOLVE_IN_A_FRESH_PROCESS = """
import json, sys, time
from preempt_cli.hub import resolve_weights
from preempt_cli.registry import ModelConfig, parse_source

cfg = ModelConfig(name="far", arch="cifar_resnet20", source=parse_source(sys.argv[1]), sha256=sys.argv[2] or None)
start = time.perf_counter()
try:
    answer = {"path": str(resolve_weights(cfg))}
except Exception as e:
    answer = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(dict(answer, seconds=time.perf_counter() - start)))
"""


def _resolve_in_a_fresh_process(endpoint: str, source: str, tmp_path: Path, sha256: str = "",
                                **env: str) -> dict:  # fmt: skip
    """``resolve_weights`` of ``source`` in a new interpreter whose huggingface_hub talks to ``endpoint`` (its
    HF_ENDPOINT is read at import) with the cache ``tmp_path/hf/hub``, online, no token, no proxy: what it
    returned or raised, and how long that took. Bounded: a run still waiting after 90 s fails the test."""
    import json
    import os
    import subprocess
    import sys

    import preempt_cli

    dropped = {"HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"}
    child_env = {k: v for k, v in os.environ.items() if k not in dropped and "proxy" not in k.lower()}
    python_path = [str(Path(preempt_cli.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]  # this preempt_cli
    child_env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
                     HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost",
                     PYTHONPATH=os.pathsep.join(filter(None, python_path)), **env)  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-c", _RESOLVE_IN_A_FRESH_PROCESS, source, sha256], cwd=tmp_path,
                              env=child_env, capture_output=True, text=True, timeout=90)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"resolving {source} against {endpoint} was still waiting after 90 s")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port of this machine that nothing listens on: a connection is refused at once (no network). Held
    bound (not listening) for the test: a port let go at once could be taken by another socket meanwhile,
    another worker's with ``pytest -n`` or ``silent_port``'s beside it, and then answer or stay silent."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port of this machine that takes connections and never answers (a firewall or proxy that drops the
    requests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)  # connections wait in the backlog, never accepted nor answered
        yield s.getsockname()[1]


@pytest.mark.parametrize("hub", ["refuses", "never-answers"])
def test_the_hub_out_of_reach_with_nothing_cached_fails_in_seconds(hub, closed_port, silent_port, tmp_path) -> None:
    """huggingface_hub asks again 5 times, 1 + 2 + 4 + 8 + 8 s apart and up to 60 s each, before it gives up
    on a file it has no copy of: a model whose weights were never downloaded took 23 s to fail without
    DNS, and minutes where requests go unanswered. One request now, within HF_HUB_ETAG_TIMEOUT (the
    user's 2 s here; 10 s by default), and the one-line error names the model, its source and why."""
    import re

    if hub == "refuses":
        answer = _resolve_in_a_fresh_process(f"http://127.0.0.1:{closed_port}", "hf://org/far/w.safetensors", tmp_path)
    else:
        answer = _resolve_in_a_fresh_process(f"http://127.0.0.1:{silent_port}", "hf://org/far/w.safetensors", tmp_path,
                                             HF_HUB_ETAG_TIMEOUT="2")  # fmt: skip
    assert answer["seconds"] < 10, answer
    message = answer.get("error", "")
    assert message.startswith("OfflineWeightsError: weights of model 'far' (hf://org/far/w.safetensors)"), answer
    assert "\n" not in message and re.search(r"the Hub cannot be reached: \w+: \S", message), message


def _hub_file(data: bytes, commit: str) -> tuple:
    """A stand-in Hub serving ``data`` as org/near's w.safetensors on its main branch (HEAD and GET, as
    huggingface_hub asks for it), 404 for anything else: ``(server, requests it got)``."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            got.append(f"{self.command} {self.path}")
            if self.path != "/org/near/resolve/main/w.safetensors":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, got


def test_a_reachable_hub_still_serves_the_download_and_its_cached_copy_serves_when_out_of_reach(
    closed_port, tmp_path
) -> None:
    """The one request made before hf_hub_download changes nothing where the Hub answers: the file is
    downloaded into the cache, checked against its pin; with the Hub then out of reach, the cached copy is
    used, at once."""
    import hashlib

    from safetensors.torch import save

    data = save({"w": torch.ones(2, 3)})
    commit = "0123456789abcdef0123456789abcdef01234567"
    server, got = _hub_file(data, commit)
    try:
        pin = hashlib.sha256(data).hexdigest()
        online = _resolve_in_a_fresh_process(f"http://127.0.0.1:{server.server_port}", "hf://org/near/w.safetensors",
                                             tmp_path, pin)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "hf" / "hub" / "models--org--near" / "snapshots" / commit / "w.safetensors"
    assert online.get("path") == str(cached) and cached.read_bytes() == data, online
    assert "GET /org/near/resolve/main/w.safetensors" in got, got
    offline = _resolve_in_a_fresh_process(f"http://127.0.0.1:{closed_port}", "hf://org/near/w.safetensors", tmp_path,
                                          pin)  # fmt: skip
    assert offline.get("path") == str(cached) and offline["seconds"] < 10, offline


def _cache_that_cannot_be_written(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """The Hub answers, but huggingface_hub cannot write ``cache`` (a shared read-only cache: its lock file is
    refused); reading what the cache holds works. (Permissions are simulated: root may write anything.)"""
    import errno

    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def download(*args, local_files_only: bool = False, **kwargs):
        if local_files_only:
            return real(*args, local_files_only=True, **kwargs)
        raise PermissionError(errno.EACCES, "Permission denied", str(cache / ".locks" / "models--org--repo"))

    set_hf_cache(monkeypatch, cache, offline=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: None)  # the Hub is there


def test_a_hub_cache_that_cannot_be_written_is_said_in_one_line(tmp_path, monkeypatch) -> None:
    """With nothing cached, huggingface_hub's PermissionError on its lock file was preempt's "internal error"."""
    from preempt_cli.errors import ConfigError

    _cache_that_cannot_be_written(monkeypatch, tmp_path / "hub")
    cfg = ModelConfig(name="h", arch="cifar_resnet20", source=parse_source("hf://org/repo/m.safetensors"))
    with pytest.raises(ConfigError) as info:
        load_model(cfg)
    message = str(info.value)
    assert "\n" not in message and "'h'" in message and "hf://org/repo/m.safetensors" in message, message
    assert str(tmp_path / "hub") in message and "Permission denied" in message and "HF_HUB_CACHE" in message


def test_a_hub_cache_that_cannot_be_written_still_serves_its_copy(tmp_path, monkeypatch, caplog) -> None:
    """A shared read-only cache that holds the weights: they are used, with a warning, as where the Hub cannot
    be reached (huggingface_hub writes its refs and locks even for a file it holds)."""
    from test_hub import make_hf_cache

    make_hf_cache(tmp_path / "hub", "org/repo", "m.safetensors", _resnet20_bytes(tmp_path))
    _cache_that_cannot_be_written(monkeypatch, tmp_path / "hub")
    cfg = ModelConfig(name="h", arch="cifar_resnet20", arch_args={"shortcut": "pad_end"},
                      source=parse_source("hf://org/repo/m.safetensors"))  # fmt: skip
    model = load_model(cfg, fuse=False)
    assert model.weights_path.startswith(str(tmp_path / "hub"))
    assert any("cannot be written" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("strip_prefixes", [("module.",), ("",)], ids=["default", "none-stripped"])
def test_weights_whose_keys_all_carry_a_prefix_say_which_strip_prefix_converts_them_to_fit(
    strip_prefixes, tmp_path
) -> None:
    """Weights converted from a DataParallel-wrapped wrapper (``module.model.`` keys, as RobustBench-style
    checkpoints hold them) said only "keys saved with a prefix": the prefix is named, with the --strip-prefix
    arguments that convert the checkpoint to keys that fit (``model.`` alone would leave ``module.`` on)."""
    import re
    import shlex

    from preempt_cli.convert import convert_checkpoint

    net = create_arch("cifar_resnet20", shortcut="pad_end")
    torch.save({"state_dict": {f"module.model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "rb.pt")
    convert_checkpoint(tmp_path / "rb.pt", tmp_path / "wrapped.safetensors", strip_prefixes=strip_prefixes)
    registry = _registry(tmp_path, {"wrapped": "wrapped.safetensors"})
    with pytest.raises(WeightsMismatchError, match="none of the file's keys fit") as info:
        load_model("wrapped", registry=[registry])
    message = str(info.value)
    assert "\n" not in message and len(message) < 800, (len(message), message)
    left = "model." if strip_prefixes == ("module.",) else "module.model."
    assert f"every key of the file starts with {left!r}" in message, message
    hint = re.search(r"preempt models convert ((?:--strip-prefix \S+ ?)+)", message)
    assert hint, message
    args = shlex.split(hint.group(1))
    convert_checkpoint(tmp_path / "rb.pt", tmp_path / "wrapped.safetensors", strip_prefixes=tuple(args[1::2]),
                       overwrite=True)  # fmt: skip
    load_model("wrapped", registry=[registry])  # the hint's arguments give weights that fit
