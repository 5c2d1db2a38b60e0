"""``preempt models convert``: refusals that name the file and say why, no torch warnings on stderr."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import raised_without_waiting_on
from preempt_cli.cli import app
from preempt_cli.convert import convert_checkpoint
from preempt_cli.errors import ConfigError

pytestmark = pytest.mark.usefixtures("isolated_config")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _convert(tmp_path: Path, obj, *, raw_pickle: bool = False, **kw) -> str:
    ckpt = tmp_path / "c.pt"
    if raw_pickle:
        ckpt.write_bytes(pickle.dumps(obj, protocol=4))
    else:
        torch.save(obj, ckpt)
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(ckpt, tmp_path / "out.safetensors", **kw)
    assert not (tmp_path / "out.safetensors").exists()
    message = str(info.value)
    assert str(ckpt) in message and "\n" not in message, message
    return message


@pytest.mark.parametrize("obj", [{}, {"state_dict": {}}], ids=["empty", "empty-state-dict"])
def test_empty_checkpoint_is_refused(obj, tmp_path) -> None:
    assert "nothing to convert" in _convert(tmp_path, obj)


@pytest.mark.parametrize(
    "obj, words",
    [
        ([torch.zeros(2)], "holds a list"),
        ({"model": {"w": torch.zeros(2), "cfg": {"x": 1}}}, "entry 'model' is not a state dict"),
        ({"a": {"b": {"c": torch.zeros(2)}}}, "--key"),
        ({"w": torch.zeros(2).to_sparse()}, "dense tensors only"),
        ({0: torch.zeros(2)}, "not a name (0)"),
        # one of several state dicts was taken without a word (the plain weights where the EMA ones were meant)
        ({"model": {"w": torch.zeros(2)}, "ema": {"w": torch.ones(2)}, "epoch": 200}, "several state dicts ('model', 'ema')"),
        ({"state_dict": {"w": torch.zeros(2)}, "state_dict_ema": {"w": torch.ones(2)}},
         "several state dicts ('state_dict', 'state_dict_ema'); name the one to convert with --key"),
        # '__metadata__': a file safetensors could not read, and exit 0
        ({"a": torch.zeros(2), "module.__metadata__": torch.zeros(2)}, "tensor 'module.__metadata__' would be named"),
    ],
    ids=["list", "mixed", "nested", "sparse", "int-key", "model-and-ema", "state-dict-and-ema", "metadata-key"],
)
def test_checkpoints_without_a_plain_state_dict_name_the_file(obj, words, tmp_path) -> None:
    assert words in _convert(tmp_path, obj)


def test_a_quantized_tensor_is_refused_with_its_name(tmp_path) -> None:
    # it was an internal KeyError (safetensors has no quantized dtypes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates making quantized tensors
        q = torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8)
    assert "tensor 'q' is quantized (qint8)" in _convert(tmp_path, {"q": q, "w": torch.zeros(2)})


def test_missing_key_names_the_file(tmp_path) -> None:
    assert "no entry 'nope'" in _convert(tmp_path, {"state_dict": {"w": torch.zeros(2)}}, key="nope")
    # a flat state dict of hundreds of keys: a few named, the rest counted (all 116 were listed)
    message = _convert(tmp_path, {f"layer{i}.weight": torch.zeros(1) for i in range(116)}, key="nope")
    assert message.endswith("(entries: layer0.weight, layer1.weight, layer2.weight, layer3.weight, layer4.weight, "
                            "layer5.weight, layer6.weight, layer7.weight and 108 more)")  # fmt: skip


def test_a_dict_of_other_tensors_beside_the_state_dict_is_no_second_candidate(tmp_path) -> None:
    from safetensors.torch import load_file

    torch.save({"state_dict": {"w": torch.zeros(2)}, "normalizer": {"mean": torch.zeros(3), "std": torch.ones(3)},
                "epoch": 3}, tmp_path / "c.pt")  # fmt: skip
    convert_checkpoint(tmp_path / "c.pt", tmp_path / "o.safetensors")
    assert set(load_file(tmp_path / "o.safetensors")) == {"w"}


def test_the_state_dict_named_with_key_is_converted_when_there_are_several(tmp_path) -> None:
    from safetensors.torch import load_file

    torch.save({"model": {"w": torch.zeros(2)}, "ema": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    convert_checkpoint(tmp_path / "c.pt", tmp_path / "o.safetensors", key="ema")
    assert torch.equal(load_file(tmp_path / "o.safetensors")["w"], torch.ones(2))


def test_malicious_pickle_names_the_disallowed_global(tmp_path) -> None:
    message = _convert(tmp_path, {"w": torch.zeros(2), "x": _Evil()})
    assert "posix.system" in message or "nt.system" in message, message
    assert "refused by torch.load(weights_only=True)" in message


def test_other_protocol_pickles_are_explained_without_torch_warnings(tmp_path) -> None:
    ckpt = tmp_path / "p4.pt"
    ckpt.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    result = CliRunner().invoke(app, ["models", "convert", str(ckpt), str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2, result.output
    assert "Warning" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert str(ckpt) in result.stderr and "protocol 4" in result.stderr
    with warnings.catch_warnings(record=True) as caught:  # pytest would hide them from stderr: look for them
        warnings.simplefilter("always")
        with pytest.raises(ConfigError):
            convert_checkpoint(ckpt, tmp_path / "o.safetensors")
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize(("output", "force", "message"), [
    (".", True, ".: is a folder: name the .safetensors file to write (e.g. ok.safetensors)"),
    ("sub", False, "sub: is a folder: name the .safetensors file to write (e.g. sub/ok.safetensors)"),
    ("sub", True, "sub: is a folder: name the .safetensors file to write (e.g. sub/ok.safetensors)"),
    ("ok.pt/x.safetensors", False, "ok.pt/x.safetensors: ok.pt is a file, not a folder"),
    ("ok.pt/new/x.safetensors", False, "ok.pt/new/x.safetensors: ok.pt is a file, not a folder"),
    # Path() drops a trailing slash: the weights were written to a file named "new" (the folder meant)
    ("new/", False, "new/: names a folder (it ends in /): name the .safetensors file to write "
                    "(e.g. new/ok.safetensors)"),
    ("new/deeper/", False, "new/deeper/: names a folder (it ends in /): name the .safetensors file to write "
                           "(e.g. new/deeper/ok.safetensors)"),
])  # fmt: skip
def test_an_output_that_is_a_folder_or_under_a_file_is_a_usage_error_before_any_work(
    output: str, force: bool, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "cannot write: Device or resource busy" (onto .) or "Is a directory", exit 1, once the checkpoint was read
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    (tmp_path / "sub").mkdir()
    loads: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(a))
    result = CliRunner().invoke(app, ["models", "convert", "ok.pt", output, *(["--force"] if force else [])])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {message}\n" and not loads
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ok.pt", "sub"]


@pytest.mark.parametrize("flag", ["--overwrite", "--force"])
def test_convert_replaces_an_output_with_overwrite_as_protect_names_it_or_its_former_name(
    flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protect, train and keygen replace an output with --overwrite: convert takes it too, --force still."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    (tmp_path / "out.safetensors").write_bytes(b"old")
    refused = CliRunner().invoke(app, ["models", "convert", "ok.pt", "out.safetensors"])
    assert refused.exit_code == 2 and "pass --overwrite to replace it" in refused.stderr, refused.output
    assert (tmp_path / "out.safetensors").read_bytes() == b"old"
    result = CliRunner().invoke(app, ["models", "convert", "ok.pt", "out.safetensors", flag])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(tmp_path / "out.safetensors")["w"], torch.ones(2))


def test_an_output_that_is_a_link_to_nowhere_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    # exists() says no of a link whose target is missing: it was replaced by the weights without --overwrite
    from safetensors.torch import load_file

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    out = tmp_path / "out.safetensors"
    out.symlink_to(tmp_path / "gone" / "w.safetensors")
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(tmp_path / "ok.pt", out)
    message = str(info.value)
    assert f"{out}: is a symbolic link to {tmp_path / 'gone' / 'w.safetensors'}, which is missing" in message
    assert "--overwrite" in message and out.is_symlink()
    convert_checkpoint(tmp_path / "ok.pt", out, overwrite=True)
    assert not out.is_symlink() and torch.equal(load_file(out)["w"], torch.ones(2))


def test_a_safetensors_file_is_said_to_need_no_conversion(tmp_path: Path) -> None:
    # it was "cannot be loaded safely with weights_only=True (Unsupported operand 16): not a PyTorch checkpoint?"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(tmp_path / "model.safetensors", tmp_path / "out.safetensors")
    message = str(info.value)
    assert f"{tmp_path / 'model.safetensors'}: is a safetensors file already, nothing to convert" in message
    assert "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "out.safetensors").exists()


def test_a_checkpoint_named_in_another_encoding_converts(tmp_path: Path) -> None:
    # its name, recorded in the output's metadata, held os.fsdecode's surrogates: "internal error:
    # UnicodeEncodeError" once the checkpoint was read
    from safetensors import safe_open

    ckpt = tmp_path / os.fsdecode(b"\xffck.pt")
    try:
        torch.save({"w": torch.ones(2)}, ckpt)
    except OSError:  # a file system that takes UTF-8 names alone (macOS)
        pytest.skip("this file system refuses a file name that is not UTF-8")
    convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.ones(2))
        assert f.metadata()["converted_from"] == "\\xffck.pt"  # the byte as Python escapes it


def test_a_checkpoint_only_its_owner_can_read_converts_to_a_file_only_its_owner_can_read(tmp_path: Path) -> None:
    # a private key's checkpoint (0600) was converted to safetensors readable by every user (0644)
    import stat

    shared, private = tmp_path / "shared.pt", tmp_path / "private.pt"
    for ckpt in (shared, private):
        torch.save({"w": torch.ones(2)}, ckpt)
    os.chmod(private, 0o600)
    old = os.umask(0o022)
    try:
        convert_checkpoint(shared, tmp_path / "shared.safetensors")
        convert_checkpoint(private, tmp_path / "private.safetensors")
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / "shared.safetensors").stat().st_mode)) == oct(0o644)
    assert oct(stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode)) == oct(0o600)


def test_an_empty_checkpoint_is_said_to_be_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.load of a 0-byte file fails with EOFError, which was shown as "(EOFError): not a PyTorch
    checkpoint?": a download or copy that wrote nothing is said as such, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    result = CliRunner().invoke(app, ["models", "convert", "empty.pt", "out.safetensors"])
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: empty.pt: is empty (0 bytes), not a checkpoint file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt"]


class _CreatesAFile:
    """A pickle whose loading would create ``path``: the proof that no pickled code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.parametrize("form", ["zip", "raw-pickle-2"])
def test_a_malicious_pickle_does_not_run_and_is_one_line(form, tmp_path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    obj = {"w": 1.0, "x": _CreatesAFile(marker)}
    if form == "zip":
        torch.save(obj, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(obj, protocol=2))
    result = CliRunner().invoke(app, ["models", "convert", str(ckpt), str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "refused by torch.load(weights_only=True)" in result.stderr and "system" in result.stderr
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_or_device_is_refused_without_waiting_on_it(tmp_path) -> None:
    """torch.load opened a FIFO and waited for a writer forever (and read /dev/zero without end)."""
    fifo = tmp_path / "c.pt"
    os.mkfifo(fifo)
    (tmp_path / "link.pt").symlink_to(fifo)
    fifo_kind = "a FIFO (a named pipe)"
    for path, kind in ((fifo, fifo_kind), (tmp_path / "link.pt", fifo_kind), (Path(os.devnull), "a device")):
        error = raised_without_waiting_on(fifo, lambda path=path: convert_checkpoint(path, tmp_path / "o.safetensors"),
                                          f"convert_checkpoint({path})")  # fmt: skip
        assert isinstance(error, ConfigError) and str(error) == f"{path}: is {kind}, not a checkpoint file", error
    assert not (tmp_path / "o.safetensors").exists()


def test_a_symbolic_link_loop_and_a_folder_are_one_line(tmp_path) -> None:
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ConfigError, match=r"loop\.pt: cannot be read: Too many levels of symbolic links"):
        convert_checkpoint(tmp_path / "loop.pt", tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match=r"dir\.pt: is a directory, not a checkpoint file"):
        convert_checkpoint(tmp_path / "dir.pt", tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match=r"none\.pt: no such file"):
        convert_checkpoint(tmp_path / "none.pt", tmp_path / "o.safetensors")


def test_a_meta_tensor_is_refused_with_its_name(tmp_path) -> None:
    # it was an internal NotImplementedError ("Cannot copy out of meta tensor; no data!")
    message = _convert(tmp_path, {"w": torch.zeros(2), "m": torch.zeros(2, device="meta")})
    assert "tensor 'm' holds no values (a meta tensor" in message


@pytest.mark.parametrize("content", [b"junk\n", b"\x89PNG\r\n\x1a\n" + bytes(32)], ids=["text", "png"])
def test_a_file_neither_zip_nor_pickle_says_it_is_no_checkpoint(content, tmp_path) -> None:
    """Its reason was torch's detail of misreading it as a pickle: "(174812789)" of a text file, "(Unsupported
    operand 137)" of a PNG, after "cannot be loaded safely", which reads as a safety problem."""
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(content)
    result = CliRunner().invoke(app, ["models", "convert", str(ckpt), str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith(f"error: {ckpt}: not a PyTorch checkpoint (")
    assert "safely" not in result.stderr and not (tmp_path / "o.safetensors").exists()
    # torch.save's legacy format (a pickle, not a zip) still converts
    torch.save({"w": torch.zeros(2)}, ckpt, _use_new_zipfile_serialization=False)
    assert convert_checkpoint(ckpt, tmp_path / "o.safetensors")[0] == 1


@pytest.mark.parametrize("members", [["hello.txt"], ["archive/version"], []], ids=["flat", "no-pickle", "empty"])
def test_a_zip_that_is_no_checkpoint_says_so_in_plain_words(members, tmp_path) -> None:
    """Its reason was torch's '[enforce fail at inline_container.cc:180] .'; torch's detail is kept for --log."""
    import zipfile

    ckpt = tmp_path / "c.pt"
    with zipfile.ZipFile(ckpt, "w") as archive:
        for name in members:
            archive.writestr(name, "3")
    log = tmp_path / "run.log"
    result = CliRunner().invoke(app, ["models", "convert", str(ckpt), str(tmp_path / "o.safetensors"),
                                      "--log", str(log)])  # fmt: skip
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr == f"error: {ckpt}: a zip archive, but not a PyTorch checkpoint (no data.pkl in it)\n"
    assert "direct cause" in log.read_text()  # torch's own reason, in the traceback the log keeps
    # a real checkpoint (a zip too) still converts
    torch.save({"w": torch.zeros(2)}, ckpt)
    assert convert_checkpoint(ckpt, tmp_path / "o.safetensors")[0] == 1


def test_key_takes_a_dotted_path_to_a_nested_state_dict(tmp_path) -> None:
    """--key reached top-level entries only: {"a": {"b": {state dict}}} could not be converted."""
    from safetensors.torch import load_file

    nested = {"a": {"b": {"w": torch.ones(2)}, "x.y": {"z": {"w": torch.full((2,), 3.0)}}},
              "model.ema": {"w": torch.full((2,), 2.0)}, "model": {"ema": {"w": torch.zeros(2)}}}  # fmt: skip
    torch.save(nested, tmp_path / "c.pt")
    for key, value in (("a.b", 1.0), ("model.ema", 2.0), ("a.x.y.z", 3.0)):  # an exact name before a path
        convert_checkpoint(tmp_path / "c.pt", tmp_path / "o.safetensors", key=key, overwrite=True)
        assert torch.equal(load_file(tmp_path / "o.safetensors")["w"], torch.full((2,), value)), key


@pytest.mark.parametrize(("key", "said"), [
    ("a.c", "no entry 'c' in entry 'a' (entries: b, n)"),
    ("q.b", "no entry 'q.b' in the checkpoint (entries: a, epoch)"),
    ("epoch.b", "entry 'epoch' holds an int, no entries: cannot take 'b' in it"),
    ("a", "the entry 'a' is not a state dict of tensors (it holds a dict of 2 entries ('b': dict, 'n': int)); "
          "name an entry inside it with --key a.NAME"),
])  # fmt: skip
def test_a_dotted_key_that_leads_nowhere_names_the_entries_where_it_fails(key, said, tmp_path) -> None:
    message = _convert(tmp_path, {"a": {"b": {"w": torch.zeros(2)}, "n": 3}, "epoch": 4}, key=key)
    assert message.endswith(said), message


def test_an_output_that_appears_while_the_checkpoint_loads_is_left_as_it_is_without_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output was checked to be absent before the load, then written with a rename that replaced whatever
    was there by then: another convert's result (or a user's file) that appeared meanwhile was overwritten
    without --overwrite."""
    from preempt_cli.errors import ImageWriteError

    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    out = tmp_path / "out.safetensors"
    real_load = torch.load

    def load_while_another_run_writes_the_output(*args, **kwargs):
        out.write_bytes(b"another run's weights")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_while_another_run_writes_the_output)
    with pytest.raises(ImageWriteError, match="appeared while this run was writing it"):
        convert_checkpoint(tmp_path / "ok.pt", out)
    assert out.read_bytes() == b"another run's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt", "out.safetensors"]  # no temporary file left
    convert_checkpoint(tmp_path / "ok.pt", out, overwrite=True)  # with --overwrite it is replaced, as asked
    assert out.read_bytes() != b"another run's weights"


def test_a_torchscript_archive_is_named_as_such(tmp_path: Path) -> None:
    """torch.load refuses a TorchScript archive with weights_only: the message was torch's "Cannot use
    ``weights_only=True`` with TorchScript archives ...", then "not a PyTorch checkpoint?"."""
    ckpt = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates TorchScript
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(ckpt))
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    message = str(info.value)
    assert message.startswith(f"{ckpt}: is a TorchScript archive (torch.jit.save)") and "\n" not in message, message
    assert "``" not in message and "not a PyTorch checkpoint?" not in message and "torch.jit.load" in message
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("dtype", ["complex32", "bits8"])
def test_a_tensor_of_a_type_safetensors_cannot_hold_is_refused_with_its_name(dtype, tmp_path) -> None:
    # it was "internal error: KeyError: torch.complex32" once the checkpoint was read
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls complex32 experimental
        odd = torch.zeros(2, dtype=getattr(torch, dtype))
    message = _convert(tmp_path, {"w": torch.zeros(2), "odd": odd})
    assert f"tensor 'odd' is {dtype}, a type safetensors cannot hold" in message, message


@pytest.mark.parametrize("output", ["new/", "new/deeper/"])
def test_the_library_refuses_an_output_ending_in_a_slash_given_as_a_string(
    output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the CLI's refusal is among the usage errors above
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pt")
    with pytest.raises(ConfigError, match="names a folder"):  # the library, given the name as a string
        convert_checkpoint(Path("ok.pt"), output)  # type: ignore[arg-type]


def test_a_flat_state_dict_with_other_entries_is_not_sent_looking_for_a_key(tmp_path) -> None:
    # it said "cannot find the state dict ...; name it with --key", where no entry holds one to name
    message = _convert(tmp_path, {"conv.weight": torch.zeros(2), "conv.bias": torch.zeros(2), "epoch": 5, "arch": "x"})
    assert "--key" not in message, message
    assert message.endswith("the checkpoint holds tensors beside entries that are not ('epoch': int, 'arch': str), "
                            "and no entry that is a state dict: save its tensors alone and convert that file")


def test_a_state_dict_found_by_its_usual_name_that_nests_another_says_which_key_reaches_it(tmp_path) -> None:
    # {"state_dict": {"model": {...}}} said only that entry 'state_dict' is not a state dict, with no way on
    message = _convert(tmp_path, {"state_dict": {"model": {"w": torch.zeros(2)}}, "epoch": 5})
    assert message.endswith("name an entry inside it with --key state_dict.NAME"), message


class _Calls:
    """A pickle whose loading would call ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(("func", "args", "name"), [
    (os.system, ("true",), "system"),
    (__import__("subprocess").call, (["true"],), "call"),  # pickled as commands.call (its Python 2 name)
    (eval, ("1",), "eval"),
])  # fmt: skip
def test_a_pickle_that_would_run_commands_is_not_met_with_advice_to_load_it_unsafely(
    func, args, name, tmp_path
) -> None:
    """The refusal of a checkpoint that would call os.system advised, as for any class it did not know, to load
    it with weights_only=False "if you trust the file": that runs the command."""
    message = _convert(tmp_path, {"w": torch.zeros(2), "x": _Calls(func, *args)})
    assert "refused by torch.load(weights_only=True)" in message and name in message, message
    assert "if you trust" not in message and "malicious" in message, message


class _SubclassedTensor(torch.Tensor):
    """A tensor subclass: torch makes the tensor, then calls for the subclass, which no inert stand-in can be."""


class _SlottedDict(dict):
    """A dict subclass with slots: its pickle gives their values as a tuple, which no stand-in for a dict takes."""

    __slots__ = ("name",)


def _slotted_dict() -> _SlottedDict:
    hparams = _SlottedDict(lr=0.1)
    hparams.name = "run-1"
    return hparams


@pytest.mark.parametrize("extra", [lambda: torch.zeros(2).as_subclass(_SubclassedTensor), _slotted_dict],
                         ids=["tensor-subclass", "dict-subclass-with-slots"])  # fmt: skip
def test_a_pickle_of_an_unknown_class_no_stand_in_takes_still_says_how_to_convert_a_trusted_file(
    extra, tmp_path
) -> None:
    message = _convert(tmp_path, {"state_dict": {"w": torch.zeros(2)}, "hparams": extra()})
    name = type(extra()).__name__
    assert name in message and "only if you trust the file" in message and "malicious" not in message, message


class _TrainingState:
    """A class of a training script's own, as pickled beside the weights: loading it must not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker, self.epoch = str(marker), 7

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()  # the proof that the class itself was called
        self.__dict__.update(state)


@pytest.mark.parametrize("form", ["zip", "legacy"])
@pytest.mark.parametrize("extra", ["numpy-float64", "argparse-namespace", "own-class", "all"])
def test_harmless_extras_beside_the_state_dict_are_left_out_and_the_weights_convert(
    extra: str, form: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A RobustBench-style training script saves its best accuracy (a numpy scalar), its argparse arguments or
    objects of its own beside the state dict: torch.load(weights_only=True) refuses the whole file for them, and
    so did convert. They are now loaded as inert stand-ins, left out of the output and named in one warning."""
    import argparse

    import numpy as np
    from safetensors.torch import load_file

    marker = tmp_path / "ran"
    extras = {"numpy-float64": {"best_acc": np.float64(0.93)},
              "argparse-namespace": {"args": argparse.Namespace(lr=0.1, arch="wrn-28-10")},
              "own-class": {"train": _TrainingState(marker), "kind": _TrainingState}}  # fmt: skip
    extras["all"] = {k: v for group in extras.values() for k, v in group.items()}
    names = {"numpy-float64": ["scalar"], "argparse-namespace": ["argparse.Namespace"],
             "own-class": ["test_convert._TrainingState"]}  # fmt: skip
    names["all"] = [name for group in names.values() for name in group]
    state = {"module.conv.weight": torch.randn(4, 3, 3, 3), "module.fc.bias": torch.arange(10.0)}
    zip_format = form == "zip"
    torch.save({"state_dict": state}, tmp_path / "plain.pt", _use_new_zipfile_serialization=zip_format)
    torch.save({"state_dict": state, "epoch": 99, **extras[extra]}, tmp_path / "c.pt",
               _use_new_zipfile_serialization=zip_format)  # fmt: skip
    convert_checkpoint(tmp_path / "plain.pt", tmp_path / "plain.safetensors")
    with caplog.at_level("WARNING", logger="preempt_cli.convert"):
        convert_checkpoint(tmp_path / "c.pt", tmp_path / "c.safetensors")
    plain, converted = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "c.safetensors")
    assert converted.keys() == plain.keys() == {"conv.weight", "fc.bias"}
    assert all(torch.equal(converted[k], plain[k]) for k in plain)
    assert not marker.exists()  # the training script's class was never called
    warned = [r.getMessage() for r in caplog.records if "torch does not load safely" in r.getMessage()]
    assert len(warned) == 1 and f"ignored {len(extras[extra])} entr" in warned[0], warned
    assert all(name in warned[0] for name in names[extra]), warned


def test_the_module_of_an_extra_s_class_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in takes the place of the class: the module the pickle names (which could run anything when
    imported) is not imported to find it."""
    import sys
    import types

    from safetensors.torch import load_file

    module = types.ModuleType("preempt_absent_training_module")
    exec("class Config:\n    def __init__(self):\n        self.depth = 28\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)  # only while the checkpoint is saved
    torch.save({"state_dict": {"w": torch.ones(3)}, "config": module.Config()}, tmp_path / "c.pt")
    monkeypatch.delitem(sys.modules, module.__name__)
    convert_checkpoint(tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert module.__name__ not in sys.modules
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], torch.ones(3))


class _Wrapper:
    def __init__(self, state: dict) -> None:
        self.state = state


@pytest.mark.parametrize("obj", [
    {"model": _Wrapper({"w": torch.zeros(2)}), "epoch": 3},
    {"state_dict": {"w": torch.zeros(2)}, "ema": _Wrapper({"w": torch.ones(2)})},
], ids=["alone", "beside-a-state-dict"])  # fmt: skip
def test_tensors_inside_an_object_of_an_unknown_class_are_refused_not_guessed_around(obj, tmp_path) -> None:
    """The stand-in for a class holds what it was given, not as the class would: weights inside it are not
    taken, nor is another state dict taken in their place without --key."""
    message = _convert(tmp_path, obj)
    entry = "model" if "model" in obj else "ema"
    assert f"entry '{entry}' holds tensors inside an object of class test_convert._Wrapper" in message, message
    assert "only if you trust the file" in message and "--key" in message and "malicious" not in message


def test_a_command_beside_harmless_extras_is_still_refused_as_possibly_malicious(tmp_path) -> None:
    import argparse

    import numpy as np

    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.zeros(2)}, "best_acc": np.float64(0.5), "args": argparse.Namespace(lr=0.1),
           "x": _CreatesAFile(marker)}  # fmt: skip
    message = _convert(tmp_path, obj)
    assert "system" in message and "malicious" in message and "if you trust" not in message, message
    assert not marker.exists()


@pytest.mark.parametrize("form", ["zip", "legacy", "pickle-2", "pickle-4"])
def test_a_command_behind_a_harmless_class_or_another_protocol_is_still_called_possibly_malicious(
    form, tmp_path
) -> None:
    """torch names the first global it refuses: a harmless class before os.system (or a protocol-4 pickle, refused
    for its protocol) got the advice to load the file with weights_only=False where it is trusted."""
    import argparse

    obj = {"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1), "x": _Calls(os.system, "true")}
    ckpt = tmp_path / "c.pt"
    if form in ("zip", "legacy"):
        torch.save(obj, ckpt, _use_new_zipfile_serialization=form == "zip")
    else:
        ckpt.write_bytes(pickle.dumps({**obj, "w": 1.0}, protocol=int(form[-1])))
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(ckpt, tmp_path / "out.safetensors")
    message = str(info.value)
    assert "system" in message and "malicious" in message and "if you trust" not in message, message
    assert "where you trust it" not in message and not (tmp_path / "out.safetensors").exists()


def test_convert_json_gives_the_sha256_a_registry_row_pins_and_the_row_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sha256 for a row's pin was only in the human line: --json gives it, and a row pinning it verifies."""
    import hashlib
    import json

    from preempt_cli.models import create_arch

    monkeypatch.chdir(tmp_path)
    net = create_arch("cifar_resnet20", shortcut="pad_end")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, "rb.pt")
    result = CliRunner().invoke(app, ["models", "convert", "rb.pt", "models/rb.safetensors", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row == {"checkpoint": "rb.pt", "output": str(Path("models/rb.safetensors")),
                   "tensors": len(net.state_dict()), "sha256": row["sha256"]}  # fmt: skip
    assert row["sha256"] == hashlib.sha256((tmp_path / "models" / "rb.safetensors").read_bytes()).hexdigest()
    (tmp_path / "r.toml").write_text('[models.rb]\narch = "cifar_resnet20"\narch_args = { shortcut = "pad_end" }\n'
                                     'input_size = [3, 32, 32]\nmean = "none"\nstd = "none"\nclasses = "cifar10"\n'
                                     f'source = "file:rb.safetensors"\nsha256 = "{row["sha256"]}"\n')  # fmt: skip
    verified = CliRunner().invoke(app, ["models", "verify", "rb", "--registry", "r.toml", "--models-dir", "models",
                                        "--json"])  # fmt: skip
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["pinned"] is True


def test_a_call_of_a_function_torch_does_not_allow_is_left_out_without_being_made(tmp_path, capfd) -> None:
    """A stand-in takes a function's place as a class's: the pickle's call of print is never made."""
    from safetensors.torch import load_file

    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Calls(print, "pwned")}, tmp_path / "c.pt")
    convert_checkpoint(tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert "pwned" not in capfd.readouterr().out
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], torch.ones(2))


#: Lightning's AttributeDict as it is (a dict whose entries are also attributes), plus what records a call of the
#: class's own code: its pickle is made with NEWOBJ (or REDUCE, with ``__reduce__``), then filled with SETITEMS.
_ATTRIBUTE_DICT = '''
CALLS = []


class AttributeDict(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __setattr__(self, key, val):
        self[key] = val

    def __delattr__(self, item):
        del self[item]

    def __setitem__(self, key, val):
        CALLS.append(("__setitem__", key))
        super().__setitem__(key, val)

    def update(self, *args, **kwargs):
        CALLS.append(("update", args, kwargs))
        super().update(*args, **kwargs)


class CalledAttributeDict(AttributeDict):
    def __reduce__(self):
        return (type(self), (), None, None, iter(self.items()))
'''


def _lightning_module(monkeypatch: pytest.MonkeyPatch, name: str = "lightning.fabric.utilities.data"):
    """A module ``name`` holding a class as Lightning's AttributeDict, in sys.modules (its parents too) so that
    torch.save pickles the class by that name; :func:`_forget` takes them out again. Lightning is never imported."""
    import sys
    import types

    module = types.ModuleType(name)
    exec(_ATTRIBUTE_DICT, module.__dict__)
    parts = name.split(".")
    for n in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:n]), types.ModuleType(".".join(parts[:n])))
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _forget(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The module ``name`` and its parents out of sys.modules: a load that needs the class must import it."""
    import sys

    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        monkeypatch.delitem(sys.modules, ".".join(parts[:n]))


def _imported_from(package: str) -> list[str]:
    import sys

    return [name for name in sys.modules if name == package or name.startswith(f"{package}.")]


@pytest.mark.parametrize("form", ["zip", "legacy"])
@pytest.mark.parametrize(("module_name", "made_by"), [
    ("lightning.fabric.utilities.data", "NEWOBJ"),
    ("pytorch_lightning.utilities.parsing", "NEWOBJ"),
    ("lightning.fabric.utilities.data", "REDUCE"),
])  # fmt: skip
def test_a_lightning_checkpoint_s_hparams_are_left_out_and_its_state_dict_converts(
    module_name: str, made_by: str, form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dict subclass beside the state dict (Lightning's hparams, an AttributeDict) refused the whole checkpoint:
    torch fills no object but a plain dict with SETITEMS. It now stands in as the other extras do, filled as a dict
    without the class's code or its module, left out and named. (torch.save pickles with protocol 2, as Lightning
    saves; torch's safe loader reads no protocol 4.)"""
    protocol = 2
    import pickletools

    from safetensors.torch import load_file

    module = _lightning_module(monkeypatch, module_name)
    cls = module.AttributeDict if made_by == "NEWOBJ" else module.CalledAttributeDict
    hparams = cls(lr=0.1, arch="wrn-28-10", milestones=[100, 150])
    state = {"model.conv.weight": torch.randn(4, 3, 3, 3), "model.bn.num_batches_tracked": torch.tensor(7),
             "model.fc.bias": torch.arange(10.0).half()}  # fmt: skip
    zip_format = form == "zip"
    torch.save({"state_dict": state}, tmp_path / "plain.pt", _use_new_zipfile_serialization=zip_format)
    torch.save({"epoch": 12, "global_step": 480, "state_dict": state, "hparams_name": "kwargs",
                "hyper_parameters": hparams}, tmp_path / "c.ckpt", pickle_protocol=protocol,
               _use_new_zipfile_serialization=zip_format)  # fmt: skip
    ops = {op.name for op, _, _ in pickletools.genops(pickle.dumps(hparams, protocol=protocol))}
    assert {made_by, "SETITEMS"} <= ops, ops  # the pickle is made as the test says
    _forget(monkeypatch, module_name)
    module.CALLS.clear()
    convert_checkpoint(tmp_path / "plain.pt", tmp_path / "plain.safetensors", strip_prefixes=("model.",))
    real_load, loads = torch.load, []

    def load(*args, **kwargs):
        named = [g[1] for g in torch.serialization.get_safe_globals() if isinstance(g, tuple)]  # (stand-in, name)
        loads.append((kwargs.get("weights_only"), f"{module_name}.{cls.__name__}" in named))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with caplog.at_level("WARNING", logger="preempt_cli.convert"):
        convert_checkpoint(tmp_path / "c.ckpt", tmp_path / "c.safetensors", strip_prefixes=("model.",))
    # torch's safe loader as it is first, then with the stand-ins, both weights_only
    assert loads == [(True, False), (True, True)], loads
    plain, converted = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "c.safetensors")
    assert converted.keys() == plain.keys() == {"conv.weight", "bn.num_batches_tracked", "fc.bias"}
    assert all(converted[k].dtype == plain[k].dtype and torch.equal(converted[k], plain[k]) for k in plain)
    assert torch.equal(converted["conv.weight"], state["model.conv.weight"])
    assert module.CALLS == [] and not _imported_from(module_name.partition(".")[0])  # nothing of it ran
    warned = [r.getMessage() for r in caplog.records if "torch does not load safely" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith(f"ignored 1 entry of classes torch does not load safely (not "
                                                   f"loaded, not converted): {module_name}.{cls.__name__}"), warned


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_objects_a_pickle_fills_as_dicts_are_found_without_loading_it(
    protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which classes get a stand-in for a dict is read from the pickle's ops (nothing loaded): the class named
    once and fetched from the memo after (protocol 4 memoizes its name's strings too), nested, made by NEWOBJ or
    REDUCE; a class whose objects are only given attributes (argparse's Namespace) is not taken for one."""
    import argparse
    import io
    from collections import OrderedDict

    from preempt_cli.convert import _filled_as_dicts

    module = _lightning_module(monkeypatch)
    pickled = pickle.dumps({"a": module.AttributeDict(x=1, inner=module.CalledAttributeDict(y=[2])),
                            "b": module.AttributeDict(z=3), "args": argparse.Namespace(lr=0.1),
                            "od": OrderedDict(w=1)}, protocol=protocol)  # fmt: skip
    legacy_like = pickle.dumps(1, protocol=2) + pickled + pickle.dumps([], protocol=2)  # pickles one after another
    for data in (pickled, legacy_like):
        found = _filled_as_dicts(io.BytesIO(data))
        assert {name for name in found if not name.startswith(("collections.", "builtins."))} == {
            "lightning.fabric.utilities.data.AttributeDict", "lightning.fabric.utilities.data.CalledAttributeDict"}


def test_a_lightning_checkpoint_pickled_with_protocol_4_is_refused_for_its_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's safe loader reads no protocol 4 (FRAME), stand-ins or not: it is said, not taken for malice."""
    module = _lightning_module(monkeypatch)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": module.AttributeDict(lr=0.1)},
               tmp_path / "c.pt", pickle_protocol=4)  # fmt: skip
    _forget(monkeypatch, "lightning.fabric.utilities.data")
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(tmp_path / "c.pt", tmp_path / "out.safetensors")
    message = str(info.value)
    assert "pickled with protocol 4" in message and "malicious" not in message, message
    assert module.CALLS == [] and not _imported_from("lightning")


def test_a_lightning_hparams_entry_is_named_as_its_class_wherever_it_is_never_taken_for_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stand-in is filled as a dict, yet it is an object of a class not loaded, as the other stand-ins: tensors
    inside it (in a dict entry, in a tuple, or the whole checkpoint) are refused unless --key names the state dict,
    and --key naming it says what it is."""
    import argparse

    from safetensors.torch import load_file

    module = _lightning_module(monkeypatch)
    attribute_dict = module.AttributeDict
    state = {"w": torch.ones(3)}
    checkpoints = {
        "nested": {"state_dict": state, "hyper_parameters": attribute_dict(
            lr=0.1, args=argparse.Namespace(depth=28), inner=attribute_dict(widen=10))},
        "tensors-inside": {"state_dict": state, "hparams": attribute_dict(ema={"w": torch.zeros(3)})},
        "in-a-tuple": {"state_dict": state, "loops": (attribute_dict(w=torch.zeros(3)),)},
        "whole": attribute_dict(state_dict=state),
    }
    for name, obj in checkpoints.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    _forget(monkeypatch, "lightning.fabric.utilities.data")
    cls = "lightning.fabric.utilities.data.AttributeDict"
    convert_checkpoint(tmp_path / "nested.pt", tmp_path / "nested.safetensors")
    assert torch.equal(load_file(tmp_path / "nested.safetensors")["w"], torch.ones(3))
    said = {
        ("nested", "hyper_parameters"): f"the entry 'hyper_parameters' is not a state dict of tensors (it holds an "
                                        f"object of class {cls} (which torch does not load safely: not loaded))",
        ("nested", "hyper_parameters.inner"): f"entry 'hyper_parameters' holds an object of class {cls} (which "
                                              "torch does not load safely: not loaded), no entries",
        ("tensors-inside", None): f"entry 'hparams' holds tensors inside an object of class {cls}",
        ("in-a-tuple", None): f"entry 'loops' holds tensors inside an object of class {cls}",
        ("whole", None): f"the checkpoint holds tensors inside an object of class {cls}",
        ("whole", "state_dict"): f"no entry 'state_dict' in the checkpoint (it holds an object of class {cls}",
    }
    for (name, key), words in said.items():
        with pytest.raises(ConfigError) as info:
            convert_checkpoint(tmp_path / f"{name}.pt", tmp_path / "out.safetensors", key=key)
        assert words in str(info.value), (name, key, str(info.value))
    for name in ("tensors-inside", "in-a-tuple"):  # --key naming the state dict beside it converts
        convert_checkpoint(tmp_path / f"{name}.pt", tmp_path / f"{name}.safetensors", key="state_dict")
        assert load_file(tmp_path / f"{name}.safetensors").keys() == {"w"}
    assert module.CALLS == [] and not _imported_from("lightning")


def _legacy_checkpoint(pickled: bytes) -> bytes:
    """A legacy torch.save file (no tensors) whose object is the pickle ``pickled``, written op by op."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    head = [MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True}]
    return b"".join(pickle.dumps(x, protocol=2) for x in head) + pickled + pickle.dumps([], protocol=2)


def _text(value: str) -> bytes:
    return pickle.BINUNICODE + len(value.encode()).to_bytes(4, "little") + value.encode()


#: An AttributeDict made (NEWOBJ) and filled with one entry, as Lightning's hparams are pickled.
_FILLED = (b"clightning.fabric.utilities.data\nAttributeDict\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.MARK
           + _text("lr") + _text("0.1") + pickle.SETITEMS)  # fmt: skip


@pytest.mark.parametrize(("ops", "words"), [
    # a method of the filled object fetched with getattr, then called: update({"a": "b"})
    (b"cbuiltins\ngetattr\n" + _FILLED + _text("update") + pickle.TUPLE2 + pickle.REDUCE + pickle.EMPTY_DICT
     + _text("a") + _text("b") + pickle.SETITEM + pickle.TUPLE1 + pickle.REDUCE, "refused by torch.load"),
    (_FILLED + pickle.EMPTY_TUPLE + pickle.REDUCE, "refused by torch.load"),  # the filled object called
    # the class filled, not an object of it
    (b"clightning.fabric.utilities.data\nAttributeDict\n" + pickle.MARK + _text("k") + _text("v") + pickle.SETITEMS,
     "refused by torch.load"),
    # a command inside it
    (b"clightning.fabric.utilities.data\nAttributeDict\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.MARK
     + _text("cmd") + b"cposix\nsystem\n" + _text("true") + pickle.TUPLE1 + pickle.REDUCE + pickle.SETITEMS,
     "malicious"),
    # attributes given before it is filled: the class's __setitem__ is not found among them
    (_FILLED + pickle.EMPTY_DICT + _text("__setitem__") + b"cbuiltins\nprint\n" + pickle.SETITEM + pickle.BUILD
     + _text("k") + _text("v") + pickle.SETITEM, "holds an object of class lightning.fabric.utilities.data."),
], ids=["getattr-then-call", "called", "class-filled", "command-inside", "attributes-then-filled"])  # fmt: skip
def test_a_dict_subclass_s_stand_in_smuggles_no_call(
    ops: bytes, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """Pickles written op by op to use the stand-in for Lightning's AttributeDict otherwise than to fill it: none
    calls the class, its methods or anything else, each is refused (a command as possibly malicious), and
    attributes given to it (a ``__setitem__``) change nothing of how it is filled."""
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(_legacy_checkpoint(pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _text("hparams") + ops
                                        + pickle.SETITEM + pickle.STOP))  # fmt: skip
    module = _lightning_module(monkeypatch)
    _forget(monkeypatch, "lightning.fabric.utilities.data")
    with pytest.raises(ConfigError) as info:
        convert_checkpoint(ckpt, tmp_path / "out.safetensors", key="hparams" if "object of class" in words else None)
    message = str(info.value)
    assert words in message and "\n" not in message, message
    assert module.CALLS == [] and not _imported_from("lightning") and not (tmp_path / "out.safetensors").exists()
    assert capfd.readouterr().out.count("k v") == 0  # print was never called with the entry
