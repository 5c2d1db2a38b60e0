"""Malformed registries: one ``error: FILE: reason`` line and exit 2, never an internal error; row validation
(types, base cycles and order, source schemes); ``models verify`` reports a registry setup error once."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from preempt_cli.cli import app
from preempt_cli.errors import RegistryError
from preempt_cli.registry import load_registry, parse_source, register_model

pytestmark = pytest.mark.usefixtures("isolated_config")

BASE = 'base = "preempt-resnet20-at"\n'


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _safetensors_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(2, 3)})


# -- files that are no registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe[models]", "UTF-16"),
        (b"[models.x]\ndescription = \"caf\xe9\"\n", "not UTF-8"),
        ("models = 3\n", "'models' must be a table"),
        ("classes = 3\n", "'classes' must be a table"),
        ("[classes]\ncifar = 3\n", "class set 'cifar' must be a list"),
    ],
    ids=["utf16", "latin1", "models-int", "classes-int", "class-set-int"],
)
def test_malformed_registry_is_one_line_naming_the_file(content, words, tmp_path) -> None:
    path = _write(tmp_path / "bad.toml", content)
    with pytest.raises(RegistryError) as info:
        load_registry([path])
    assert str(path) in str(info.value) and words in str(info.value)
    result = CliRunner().invoke(app, ["models", "list", "--registry", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {path}: ") and result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr


@pytest.mark.parametrize("command", [["list"], ["show", "h2"], ["verify", "h2"]], ids=["list", "show", "verify"])
def test_models_commands_print_registry_warnings_as_warnings(command: list[str], tmp_path) -> None:
    # the models commands set up no logging: the line came bare, without the "warning: " of the other commands
    path = _write(tmp_path / "reg.toml", '[models.h2]\narch = "cifar_resnet20"\nsource = "hf://a/b/c.safetensors"\n'
                                         f'sha256 = "{"a" * 64}"\n')  # fmt: skip
    result = CliRunner().invoke(app, ["models", *command, "--registry", str(path)])
    lines = [line for line in result.stderr.splitlines() if "pins a sha256" in line]
    assert lines == [f"warning: {path}: model 'h2' pins a sha256 but its source hf://a/b/c.safetensors follows the "
                     "main branch, which can move: pin a commit (@<40-hex sha>)"], result.stderr  # fmt: skip


def test_weights_passed_as_registry_are_recognised(tmp_path) -> None:
    path = _write(tmp_path / "w.safetensors", _safetensors_bytes())
    with pytest.raises(RegistryError, match="not a TOML registry but a safetensors weights file") as info:
        load_registry([path])
    assert str(path) in str(info.value)


def test_a_directory_as_registry_is_called_a_directory(tmp_path) -> None:
    with pytest.raises(RegistryError, match="is a directory") as info:
        load_registry([tmp_path])
    assert "not found" not in str(info.value)
    with pytest.raises(RegistryError, match="registry file not found"):
        load_registry([tmp_path / "absent.toml"])


def test_register_model_refuses_a_registry_with_models_not_a_table(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", "models = 3\n")
    with pytest.raises(RegistryError, match="'models' must be a table"):
        register_model("x", {"arch": "cifar_resnet20", "source": "x.safetensors"}, path)


# -- row validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, words",
    [
        ("dataset = 7", "dataset must be a non-empty string"),
        ('dataset = ""', "dataset must be a non-empty string"),
        ("paper_name = 5", "paper_name must be a string"),
        ("notes = [1]", "notes must be a string"),
        ("description = 1.5", "description must be a string"),
        ('arch = ""', "arch must be a non-empty string"),
        ("source = 5", "source must be a string"),
        ("sha256 = 5", "sha256 must be 64 hex digits"),
        ("role = 3", "role must be one of"),
        ('base = 3\narch = "cifar_resnet20"\nsource = "x.safetensors"', "base must be a model name"),
        ('arch_args = { checkpoint_path = "/k.pth" }', "arch_args cannot set checkpoint_path"),
        ("arch_args = { pretrained = true, pretrained_cfg_overlay = {} }", "cannot set pretrained, pretrained_cfg_overlay"),
        ("arch_args = { drop = nan }", "arch_args must hold finite numbers"),
        ("arch_args = { sizes = [1.0, inf] }", "arch_args must hold finite numbers"),
    ],
)
def test_row_fields_of_the_wrong_type_are_refused(line, words, tmp_path) -> None:
    base = "" if line.startswith("base") else BASE
    path = _write(tmp_path / "r.toml", f"[models.t]\n{base}{line}\n")
    with pytest.raises(RegistryError, match=words) as info:
        load_registry([path])
    assert str(path) in str(info.value) and "'t'" in str(info.value)



@pytest.mark.parametrize("written", ["{hex}", "{HEX}", "sha256:{hex}", "SHA256:{HEX}", " sha256:{hex}\n"],
                         ids=["hex", "capitals", "prefixed", "prefixed-capitals", "spaces"])  # fmt: skip
def test_a_pin_with_a_sha256_prefix_or_in_capitals_is_read_as_its_hex(written, tmp_path) -> None:
    # "sha256:HEX" (pip's --hash, OCI digests) was refused as "must be 64 hex digits", naming nothing
    digest = "0123456789abcdef" * 4
    value = written.format(hex=digest, HEX=digest.upper()).replace("\n", "\\n")
    path = _write(tmp_path / "r.toml", f'[models.t]\n{BASE}sha256 = "{value}"\n')
    assert load_registry([path])["t"].sha256 == digest


@pytest.mark.parametrize(("value", "said"), [
    ('"' + "a" * 63 + '"', "got '" + "a" * 63 + "' (63 characters)"),
    ('"md5:' + "a" * 64 + '"', "(68 characters)"),
    ('"' + "g" * 64 + '"', "(64 characters)"),
    ('""', "got '' (0 characters)"),
    ("5", "got 5"),
])  # fmt: skip
def test_a_pin_that_is_no_sha256_is_refused_saying_what_was_given(value, said, tmp_path) -> None:
    path = _write(tmp_path / "r.toml", f"[models.t]\n{BASE}sha256 = {value}\n")
    with pytest.raises(RegistryError) as info:
        load_registry([path])
    message = str(info.value)
    assert message.startswith(f"{path}: model 't': sha256 must be 64 hex digits") and said in message, message

def test_a_row_with_an_empty_name_is_refused(tmp_path) -> None:
    # no command could name it, and every unknown name's "did you mean" offered it as ", "
    path = _write(tmp_path / "r.toml", f'[models.""]\n{BASE}')
    with pytest.raises(RegistryError, match="empty name"):
        load_registry([path])


def test_a_registry_saved_with_a_byte_order_mark_is_read_and_rewritten_without_it(tmp_path) -> None:
    # Windows editors write one: "not valid TOML: Invalid statement (at line 1, column 1)", and as
    # PREEMPT_REGISTRY it broke every command
    path = _write(tmp_path / "r.toml", b"\xef\xbb\xbf[models.t]\n" + BASE.encode())
    assert load_registry([path])["t"].arch == "cifar_resnet20"
    register_model("u", {"arch": "cifar_resnet20", "source": "file:/u.safetensors"}, path)
    assert not path.read_bytes().startswith(b"\xef\xbb\xbf") and set(load_registry([path])) >= {"t", "u"}


def test_empty_free_text_clears_an_inherited_value(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", f'[models.a]\n{BASE}notes = "get it"\n[models.b]\nbase = "a"\nnotes = ""\n')
    models = load_registry([path])
    assert models["a"].notes == "get it" and models["b"].notes == ""


@pytest.mark.parametrize(
    "text, cycle",
    [
        ('[models.x]\nbase = "y"\n[models.y]\nbase = "x"\n', "x -> y -> x"),
        ('[models.x]\nbase = "x"\n', "x -> x"),
        ('[models.w]\nbase = "x"\n[models.x]\nbase = "y"\n[models.y]\nbase = "z"\n[models.z]\nbase = "x"\n',
         "x -> y -> z -> x"),
    ],
    ids=["two", "self", "three"],
)
def test_base_cycles_are_named(text, cycle, tmp_path) -> None:
    path = _write(tmp_path / "r.toml", text)
    with pytest.raises(RegistryError, match="cycle") as info:
        load_registry([path])
    assert cycle in str(info.value) and "is not defined" not in str(info.value)


def test_base_may_be_written_after_the_row_naming_it(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", f'[models.a]\nbase = "b"\nrole = "classifier"\n[models.b]\n{BASE}dataset = "mine"\n')
    models = load_registry([path])
    assert models["a"].dataset == "mine" and models["a"].arch == models["preempt-resnet20-at"].arch


def test_a_row_naming_itself_extends_the_lower_row(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", '[models.preempt-resnet20-at]\nbase = "preempt-resnet20-at"\ndataset = "x"\n')
    cfg = load_registry([path])["preempt-resnet20-at"]
    assert cfg.dataset == "x" and cfg.arch == "cifar_resnet20"


@pytest.mark.parametrize("source", ["ftp://foo/bar.safetensors", "https://example.com/w.safetensors", "s3://b/k"])
def test_unknown_url_schemes_are_refused(source, tmp_path) -> None:
    with pytest.raises(ValueError, match="hf://ORG/REPO/FILE"):
        parse_source(source)
    path = _write(tmp_path / "r.toml", f'[models.t]\n{BASE}source = "{source}"\n')
    with pytest.raises(RegistryError) as info:
        load_registry([path])
    message = str(info.value)
    assert source.split("://")[0] + "://" in message and "timm:MODEL" in message and "file:PATH" in message
    # paths and the accepted forms still parse
    assert parse_source("file:///abs/w.safetensors").kind == "file"
    assert parse_source("models/w.safetensors").kind == "file"
    assert parse_source("hf://org/repo/w.safetensors").kind == "hf"


# -- models verify: a registry that cannot be read is a setup error -------------------------------------------------


@pytest.mark.parametrize("kind", ["syntax", "missing", "directory", "utf16"])
def test_models_verify_reports_a_broken_registry_once_with_exit_2(kind, tmp_path) -> None:
    registry = {
        "syntax": lambda: _write(tmp_path / "syntax.toml", "[models\n"),
        "missing": lambda: tmp_path / "nonexist.toml",
        "directory": lambda: tmp_path,
        "utf16": lambda: _write(tmp_path / "u.toml", b"\xff\xfe[models]"),
    }[kind]()
    result = CliRunner().invoke(app, ["models", "verify", "preempt-resnet20-at", "preempt-resnet20-std",
                                      "--registry", str(registry)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.count("error:") == 1, result.stderr
    assert result.stderr.startswith(f"error: {registry}: "), result.stderr


def test_models_verify_unknown_name_is_still_a_failure_of_that_model(tmp_path) -> None:
    result = CliRunner().invoke(app, ["models", "verify", "nope", "preempt-resnet20-at"])
    assert result.exit_code == 1, result.output
    assert "error: nope: unknown model 'nope'" in result.stderr
    assert "ok  preempt-resnet20-at" in result.stdout


# -- timm that cannot be imported --------------------------------------------------------------------------------


class _BrokenTimm:
    """An import of timm that fails as with a torchvision built for another torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "timm" or name.startswith("timm."):
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_a_timm_model_with_a_broken_timm_is_a_config_error_naming_the_cause(monkeypatch) -> None:
    """A torchvision of another torch makes ``import timm`` raise RuntimeError: it was "internal error:
    RuntimeError: operator torchvision::nms does not exist", exit 2, with nothing about timm."""
    import sys

    from preempt_cli import load_model
    from preempt_cli.errors import ConfigError

    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTimm(), *sys.meta_path])
    with pytest.raises(ConfigError) as info:
        load_model("deit-b", device="cpu")
    message = str(info.value)
    assert "needs timm, which cannot be imported (RuntimeError: operator torchvision::nms" in message
    assert "built-in architectures do not need it" in message
    result = CliRunner().invoke(app, ["models", "verify", "deit-b", "preempt-resnet20-at"])
    assert result.exit_code == 1 and "internal error" not in result.stderr  # the built-in one still loads
    assert "ok  preempt-resnet20-at" in result.stdout and "deit-b" in result.stderr


def test_a_dotted_model_name_written_unquoted_says_to_quote_it(tmp_path) -> None:
    # [models.key.v2] is the row "key" holding a table "v2": "model 'key': unknown field(s) v2" named a model
    # the user never wrote, and not the quoting that registers such a name (as register_model writes it)
    registry = tmp_path / "mine.toml"
    registry.write_text('[models.key.v2]\nbase = "cifar10-resnet20-pgdat-a"\n')
    with pytest.raises(RegistryError) as info:
        load_registry([registry])
    assert '[models."key.v2"]' in str(info.value), str(info.value)
    registry.write_text('[models.key]\nbase = "cifar10-resnet20-pgdat-a"\nsha265 = "ab"\n')  # a plain misspelling
    with pytest.raises(RegistryError, match=r"unknown field\(s\) sha265$"):
        load_registry([registry])
