"""The model registry: built-in rows, user and --registry layers, base inheritance, validation, sources."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from preempt_cli.errors import RegistryError, UnknownModelError
from preempt_cli.models import create_arch, is_arch
from preempt_cli.registry import (
    ModelConfig,
    Source,
    builtin_class_sets,
    builtin_registry_path,
    check_registrable,
    get_model_config,
    list_models,
    load_registry,
    parse_source,
    register_model,
    registry_files,
    user_registry_path,
    with_source,
)

pytestmark = pytest.mark.usefixtures("isolated_config")

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEV_MODELS = (
    "cifar10-resnet20-pgdat-a", "cifar10-resnet20-pgdat-b", "cifar10-resnet20-pgdat-c", "cifar10-resnet18-std",
    "cifar10-resnet20-std", "cifar10-resnet32-std", "cifar10-resnet44-std", "cifar10-resnet56-std",
)  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the built-in registry ----------------------------------------------------------------------------------


def test_builtin_registry_parses() -> None:
    path = builtin_registry_path()
    assert path.is_file()
    models = load_registry()
    assert set(DEV_MODELS) <= set(models)
    assert {"preact18", "resnext29-augmix", "wrn-94-16", "deit-b", "convnext-l-convstem"} <= set(models)
    assert registry_files() == [path]  # isolated: no user registry
    for name, cfg in models.items():
        assert cfg.name == name
        assert cfg.registry_file == path
        assert cfg.role in ("backbone", "classifier", "victim", "any")
        assert len(cfg.input_size) == 3 and all(s > 0 for s in cfg.input_size)
        assert cfg.description
        if cfg.mean is not None:
            assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
            assert all(s > 0 for s in cfg.std)
        if cfg.classes is not None:
            assert len(cfg.classes) == cfg.num_classes
        if cfg.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", cfg.sha256)
        if cfg.source.kind == "file":
            assert cfg.source.location.endswith(".safetensors"), name  # never a pickle


def test_builtin_archs_are_known() -> None:
    import timm

    skipped = []
    for name, cfg in load_registry().items():
        if "not built into" in cfg.notes:
            skipped.append(name)  # documented as unavailable in this version
            assert not is_arch(cfg.arch) and not timm.is_model(cfg.arch)
            continue
        if is_arch(cfg.arch):
            # The registered arch_args are accepted and the head has num_classes outputs (meta: no memory).
            with torch.device("meta"):
                net = create_arch(cfg.arch, num_classes=cfg.num_classes, **cfg.arch_args)
                out = net(torch.empty(2, *cfg.input_size))
            assert tuple(out.shape) == (2, cfg.num_classes), name
        else:
            assert timm.is_model(cfg.arch), f"{name}: arch {cfg.arch!r} unknown to preempt and timm"
    assert skipped == ["convnext-l-convstem"]


def test_a_row_of_an_unknown_architecture_says_so_before_looking_for_weights(tmp_path: Path) -> None:
    """It told the user where to put weights that no file could make loadable."""
    from preempt_cli.errors import ConfigError
    from preempt_cli.models import load_model

    with pytest.raises(ConfigError, match="neither built into preempt nor known to timm") as raised:
        load_model("convnext-l-convstem", models_dir=tmp_path)
    assert "--models-dir" not in str(raised.value)


def test_builtin_rows_are_the_documented_ones() -> None:
    models = load_registry()
    a = models["cifar10-resnet20-pgdat-a"]
    assert (a.arch, dict(a.arch_args), a.mean, a.std, a.role) == (
        "cifar_resnet20", {"shortcut": "pad_end"}, None, None, "backbone"
    )  # fmt: skip
    assert a.classes == CIFAR10 and a.num_classes == 10 and a.dataset == "cifar10"
    assert a.source == Source("file", "cifar10_resnet20_pgdat_a.safetensors")
    # base inheritance inside the built-in file: b keeps a's architecture, changes source, pin and role.
    b = models["cifar10-resnet20-pgdat-b"]
    assert (b.arch, dict(b.arch_args), b.mean, b.classes) == (a.arch, dict(a.arch_args), None, CIFAR10)
    assert b.source.location == "cifar10_resnet20_pgdat_b.safetensors" and b.sha256 != a.sha256
    assert b.role == "victim"
    r32 = models["cifar10-resnet32-std"]
    r20 = models["cifar10-resnet20-std"]
    assert r32.arch == "cifar_resnet32" and r32.mean == r20.mean == (0.485, 0.456, 0.406)
    assert r32.std == (0.229, 0.224, 0.225) and dict(r32.arch_args) == {"shortcut": "pad_both"}
    assert r32.role == "any"  # inherited
    deit = models["deit-b"]
    assert deit.source == Source("timm", "deit_base_patch16_224.fb_in1k") and deit.num_classes == 1000
    assert deit.input_size == (3, 224, 224)
    # sha256 pins differ between all the development files
    pins = [models[n].sha256 for n in DEV_MODELS]
    assert None not in pins and len(set(pins)) == len(pins)


def test_list_models_by_role() -> None:
    names = list_models()
    assert names == sorted(names)
    backbones = list_models(role="backbone")
    assert "cifar10-resnet20-pgdat-a" in backbones and "preact18" in backbones
    assert "cifar10-resnet20-std" in backbones  # role "any" fits every role
    assert "cifar10-resnet18-std" not in backbones  # a classifier
    assert "cifar10-resnet18-std" in list_models(role="classifier")
    with pytest.raises(ValueError, match="unknown role 'bogus'"):  # it listed the rows of role any
        list_models(role="bogus")


# -- user registry and --registry files ------------------------------------------------------------------------

USER_ROWS = """
[models.my-robust]
arch = "cifar_resnet20"
arch_args = { shortcut = "pad_end" }
dataset = "cifar10"
classes = "cifar10"
source = "file:my_robust.safetensors"
role = "backbone"
description = "my own key"

[models.cifar10-resnet20-std]
arch = "cifar_resnet20"
arch_args = { shortcut = "pad_both" }
classes = ["a", "b", "c"]
source = "hf://me/resnets/r20.safetensors@v1"
description = "overridden by the user"
"""


def test_user_registry_in_xdg_config_adds_and_overrides(isolated_config: Path) -> None:
    user_file = _write(isolated_config / "preempt" / "models.toml", USER_ROWS)
    assert user_registry_path() == user_file
    assert registry_files() == [builtin_registry_path(), user_file]
    models = load_registry()
    mine = models["my-robust"]
    assert mine.registry_file == user_file and mine.role == "backbone" and mine.classes == CIFAR10
    over = models["cifar10-resnet20-std"]
    assert over.description == "overridden by the user"
    assert over.classes == ("a", "b", "c") and over.num_classes == 3
    assert over.source == Source("hf", "me/resnets", "r20.safetensors", "v1")
    assert over.mean is None and over.sha256 is None  # a full row replaces the built-in one
    assert models["cifar10-resnet20-pgdat-a"].registry_file == builtin_registry_path()  # others untouched


def test_preempt_registry_env_names_the_user_registry(isolated_config: Path, tmp_path, monkeypatch) -> None:
    _write(isolated_config / "preempt" / "models.toml", '[models.from-xdg]\narch = "x"\nsource = "a.safetensors"\n')
    env_file = _write(tmp_path / "elsewhere" / "reg.toml", USER_ROWS)
    monkeypatch.setenv("PREEMPT_REGISTRY", str(env_file))
    assert user_registry_path() == env_file
    models = load_registry()
    assert "my-robust" in models and "from-xdg" not in models
    # A PREEMPT_REGISTRY that does not exist is an error naming it, as a missing --registry file is (a typo
    # dropped its models without a word: "unknown model")
    monkeypatch.setenv("PREEMPT_REGISTRY", str(tmp_path / "absent.toml"))
    absent = re.escape(str(tmp_path / "absent.toml"))
    with pytest.raises(RegistryError, match=f"^{absent}: PREEMPT_REGISTRY names no file"):
        load_registry()
    # A folder there is a mistake to name, not "no registry": it used to be skipped silently.
    monkeypatch.setenv("PREEMPT_REGISTRY", str(tmp_path / "elsewhere"))
    with pytest.raises(RegistryError, match="PREEMPT_REGISTRY is a directory"):
        load_registry()


def test_a_preempt_registry_naming_no_file_is_refused_by_reading_and_registering(tmp_path, monkeypatch) -> None:
    # a typo in PREEMPT_REGISTRY said only "unknown model 'k1'", as if the file had no such row
    from typer.testing import CliRunner

    from preempt_cli.cli import app

    typo = tmp_path / "typo.toml"
    monkeypatch.setenv("PREEMPT_REGISTRY", str(typo))
    result = CliRunner().invoke(app, ["models", "show", "k1"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: {typo}: PREEMPT_REGISTRY names no file (registry file not found): correct it, "
                             "create the file (an empty one is an empty registry), or unset PREEMPT_REGISTRY\n")  # fmt: skip
    # as a --registry file naming none is (with the user registry in the config dir, which may be missing)
    monkeypatch.delenv("PREEMPT_REGISTRY")
    result = CliRunner().invoke(app, ["models", "show", "k1", "--registry", str(typo)])
    assert result.exit_code == 2 and result.stderr == f"error: {typo}: registry file not found\n", result.output
    # registering there (train, keygen) is refused before their work, and creates nothing
    monkeypatch.setenv("PREEMPT_REGISTRY", str(typo))
    with pytest.raises(RegistryError, match="PREEMPT_REGISTRY names no file"):
        check_registrable("k1")
    assert not typo.exists()
    typo.write_text("")  # created: an empty registry, which registering fills
    assert "k1" not in load_registry()
    register_model("k1", {"arch": "cifar_resnet20", "source": "file:/keys/k1.safetensors"})
    assert get_model_config("k1").registry_file == typo


def test_registering_writes_through_a_linked_user_registry_and_keeps_its_mode(isolated_config: Path, tmp_path) -> None:
    # a registry kept in a dotfiles repository and linked into the config dir: registering replaced the link
    # by a file of its own, readable by all (0644), and the private (0600) file it led to got no row
    real = _write(tmp_path / "dotfiles" / "models.toml", "# my keys\n")
    real.chmod(0o600)
    link = isolated_config / "preempt" / "models.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    row = {"arch": "cifar_resnet20", "source": "file:/keys/k1.safetensors"}
    assert register_model("k1", row) == link
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert real.read_text().startswith("# my keys\n") and "[models.k1]" in real.read_text()
    assert get_model_config("k1").source.location == "/keys/k1.safetensors"
    assert [p.name for p in link.parent.iterdir()] == ["models.toml"]  # no lock nor probe left beside the link
    # a link to a file not yet made (a fresh checkout of the dotfiles): the file is made where it leads
    link.unlink()
    link.symlink_to(tmp_path / "new" / "models.toml")
    register_model("k2", {**row, "source": "file:/keys/k2.safetensors"})
    assert link.is_symlink() and "[models.k2]" in (tmp_path / "new" / "models.toml").read_text()
    # a plain file keeps its mode too
    plain = _write(tmp_path / "plain.toml", "")
    plain.chmod(0o640)
    register_model("k3", row, plain)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o640 and "[models.k3]" in plain.read_text()


@pytest.mark.parametrize("fails", ["lock", "write"])
def test_a_registry_unwritable_after_its_check_is_a_one_line_registry_error(fails: str, tmp_path, monkeypatch) -> None:
    # checked before the work, the folder may still change before the result is registered: the lock's
    # mkdir raised a bare NotADirectoryError ("internal error"), the write an ImageWriteError (exit 1)
    import preempt_cli.registry as registry

    monkeypatch.setattr(registry, "_check_writable", lambda path: None, raising=False)  # the check passed
    if fails == "lock":
        (tmp_path / "afile").write_bytes(b"")  # a file where the registry's folder should be
        path, reason = tmp_path / "afile" / "models.toml", "cannot be written: cannot create its lock file"
    else:
        path, reason = tmp_path / "models.toml", "cannot write: Permission denied"

        def denied(*args, **kwargs):  # root writes anywhere: refuse the write's temporary file
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(RegistryError) as info:
        register_model("k1", {"arch": "cifar_resnet20", "source": "file:/keys/k1.safetensors"}, path)
    assert str(info.value).startswith(f"{path}: {reason}") and "\n" not in str(info.value), str(info.value)
    assert not path.exists()


def test_extra_registry_with_base_inheritance(isolated_config: Path, tmp_path) -> None:
    _write(isolated_config / "preempt" / "models.toml", USER_ROWS)
    extra = _write(
        tmp_path / "team.toml",
        """
[models.team-key]
base = "cifar10-resnet20-pgdat-a"
source = "file:keys/team_key.safetensors"
role = "backbone"
description = "fine-tuned from pgdat-a"

[models.team-key-imagenet-norm]
base = "team-key"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[models.my-robust]
base = "my-robust"
description = "the extra file wins over the user registry"
""",
    )
    models = load_registry([extra])
    base = models["cifar10-resnet20-pgdat-a"]
    key = models["team-key"]
    assert (key.arch, dict(key.arch_args), key.classes, key.input_size, key.mean) == (
        base.arch, dict(base.arch_args), base.classes, base.input_size, None,
    )  # fmt: skip
    assert key.source == Source("file", "keys/team_key.safetensors")
    assert key.registry_file == extra  # relative paths resolve against the extra file
    assert key.description == "fine-tuned from pgdat-a"
    # A new weights file is not checked against the base's pin (it could never match).
    assert key.sha256 is None
    chained = models["team-key-imagenet-norm"]
    assert chained.mean == (0.485, 0.456, 0.406) and chained.source == key.source and chained.arch == base.arch
    assert models["my-robust"].description == "the extra file wins over the user registry"
    assert models["my-robust"].arch_args == {"shortcut": "pad_end"}
    assert get_model_config("team-key", [extra]) == key
    # Without the extra file, its models are unknown.
    with pytest.raises(UnknownModelError):
        get_model_config("team-key")


def test_base_keeps_pin_when_source_is_kept(tmp_path) -> None:
    extra = _write(
        tmp_path / "r.toml",
        '[models.relabelled]\nbase = "cifar10-resnet20-pgdat-a"\nrole = "victim"\n',
    )
    cfg = get_model_config("relabelled", [extra])
    base = get_model_config("cifar10-resnet20-pgdat-a")
    assert cfg.sha256 == base.sha256 and cfg.source == base.source and cfg.role == "victim"


def test_registry_sees_edits_to_a_file(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", '[models.m]\narch = "cifar_resnet20"\nsource = "a.safetensors"\n')
    assert get_model_config("m", [path]).source.location == "a.safetensors"
    path.write_text('[models.m]\narch = "cifar_resnet20"\nsource = "b.safetensors"\n')
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # mtimes can be coarse
    assert get_model_config("m", [path]).source.location == "b.safetensors"


# -- unknown models and invalid files ------------------------------------------------------------------------------


def test_unknown_model_is_a_helpful_error() -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model_config("cifar10-resnet20")
    message = str(info.value)
    assert "'cifar10-resnet20'" in message
    assert "Did you mean" in message and "cifar10-resnet20-pgdat-a" in message
    assert "preempt models list" in message and "--registry" in message
    assert isinstance(info.value, KeyError) and info.value.name == "cifar10-resnet20"
    assert "cifar10-resnet56-std" in info.value.known
    with pytest.raises(UnknownModelError) as info:
        get_model_config("zzz-nothing-like-it")
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize("typo, meant", [
    ("preemt-resnet20-at", "preempt-resnet20-at"),  # a letter left out
    ("cifar10-resnet20-pgdta-a", "cifar10-resnet20-pgdat-a"),  # two letters swapped
    ("cifar10_resnet20_pgdat_a", "cifar10-resnet20-pgdat-a"),  # the weights file's stem, as named in the row
    ("cifar10-resnet65-std", "cifar10-resnet56-std"),
])  # fmt: skip
def test_a_misspelt_model_name_suggests_the_model_meant(typo: str, meant: str) -> None:
    # only names holding the typo whole (or held by it) were suggested: a letter wrong gave no suggestion
    with pytest.raises(UnknownModelError) as info:
        get_model_config(typo)
    message = str(info.value)
    suggested = message.partition("Did you mean ")[2].partition("?")[0].split(", ")
    assert meant in suggested, message
    assert len(suggested) <= 3, message

GOOD = 'arch = "cifar_resnet20"\nsource = "file:w.safetensors"\n'

INVALID_ROWS = {
    "missing-source": ('arch = "cifar_resnet20"\n', "missing field 'source'"),
    "missing-arch": ('source = "w.safetensors"\n', "missing field 'arch'"),
    "bad-sha-short": (GOOD + 'sha256 = "abc123"\n', "sha256"),
    "bad-sha-nonhex": (GOOD + f'sha256 = "{"g" * 64}"\n', "sha256"),
    "unknown-field": (GOOD + 'colour = "red"\n', "unknown field(s) colour"),
    "input-size-2d": (GOOD + "input_size = [3, 32]\n", "input_size"),
    "input-size-str": (GOOD + 'input_size = "big"\n', "input_size"),
    "input-size-zero": (GOOD + "input_size = [3, 0, 32]\n", "input_size"),
    "input-size-float": (GOOD + "input_size = [3.0, 32, 32]\n", "input_size"),
    "mean-without-std": (GOOD + "mean = [0.5, 0.5, 0.5]\n", "mean and std"),
    "bad-mean": (GOOD + 'mean = "grey"\nstd = [1, 1, 1]\n', "mean"),
    "bad-role": (GOOD + 'role = "attacker"\n', "role"),
    "unknown-class-set": (GOOD + 'classes = "cifar1000"\n', "class set"),
    "classes-count": (GOOD + 'classes = ["a", "b"]\nnum_classes = 3\n', "2 class names for 3 classes"),
    "bad-hf-source": ('arch = "x"\nsource = "hf://org/repo"\n', "hf://ORG/REPO/FILE"),
    "empty-source": ('arch = "x"\nsource = ""\n', "empty source"),
    "unknown-base": ('base = "no-such-model"\nsource = "w.safetensors"\n', "base model 'no-such-model'"),
}




def test_invalid_files_are_registry_errors(tmp_path) -> None:
    cases = {
        "not-toml.toml": ("[models.x\narch = 1", "not valid TOML"),
        "top-level.toml": ("[weights]\nx = 1\n", "unknown top-level table(s) weights"),
        "not-a-table.toml": ("[models]\nx = 3\n", "expected a table"),
    }
    for name, (text, reason) in cases.items():
        path = _write(tmp_path / name, text)
        with pytest.raises(RegistryError) as info:
            load_registry([path])
        assert str(path) in str(info.value) and reason in str(info.value), str(info.value)
    missing = tmp_path / "missing.toml"
    with pytest.raises(RegistryError, match="registry file not found") as info:
        load_registry([missing])
    assert str(missing) in str(info.value)


def test_invalid_user_registry_names_the_user_file(isolated_config: Path) -> None:
    user_file = _write(isolated_config / "preempt" / "models.toml", "[models.x]\narch = 'a'\n")
    with pytest.raises(RegistryError) as info:
        load_registry()
    assert str(user_file) in str(info.value) and "missing field 'source'" in str(info.value)


def test_int_input_size_means_square_rgb(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", f"[models.sq]\n{GOOD}input_size = 64\nnum_classes = 100\n")
    cfg = get_model_config("sq", [path])
    assert cfg.input_size == (3, 64, 64) and cfg.num_classes == 100 and cfg.classes is None


# -- sources -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://org/repo/model.safetensors@abc123", Source("hf", "org/repo", "model.safetensors", "abc123")),
        ("hf://org/repo/sub/dir/w.safetensors", Source("hf", "org/repo", "sub/dir/w.safetensors", None)),
        ("hf://org/repo/w.safetensors@", Source("hf", "org/repo", "w.safetensors", None)),
        (
            "hf://org/repo/w.safetensors@0123456789abcdef0123456789abcdef01234567",
            Source("hf", "org/repo", "w.safetensors", "0123456789abcdef0123456789abcdef01234567"),
        ),
        ("timm:resnet50.a1_in1k", Source("timm", "resnet50.a1_in1k")),
        ("file:weights/w.safetensors", Source("file", "weights/w.safetensors")),
        ("file:/abs/w.safetensors", Source("file", "/abs/w.safetensors")),
        ("w.safetensors", Source("file", "w.safetensors")),
        ("  ~/models/w.safetensors ", Source("file", "~/models/w.safetensors")),
    ],
)
def test_parse_source(text: str, expected: Source) -> None:
    src = parse_source(text)
    assert src == expected
    assert parse_source(str(src)) == src  # str() round-trips


@pytest.mark.parametrize(
    "text", ["hf://org/repo", "hf://org/repo/", "hf://org//w.safetensors", "hf://", "hf:///repo/w", "timm:", "", "file:"]
)
def test_parse_source_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_source(text)


def test_source_str() -> None:
    assert str(Source("hf", "org/repo", "w.safetensors", "main")) == "hf://org/repo/w.safetensors@main"
    assert str(Source("hf", "org/repo", "w.safetensors")) == "hf://org/repo/w.safetensors"
    assert str(Source("timm", "vit_base")) == "timm:vit_base"
    assert str(Source("file", "a/b.safetensors")) == "a/b.safetensors"


def test_with_source_drops_the_pin() -> None:
    cfg = get_model_config("cifar10-resnet20-pgdat-a")
    other = with_source(cfg, "hf://me/keys/k.safetensors@main")
    assert other.sha256 is None and other.source.kind == "hf" and other.arch == cfg.arch
    assert cfg.sha256 is not None  # the original is unchanged (frozen)


def test_class_names_and_indices() -> None:
    cfg = get_model_config("cifar10-resnet18-std")
    assert cfg.class_name(3) == "cat" and cfg.class_name(42) == "42"
    assert cfg.class_index("Cat") == 3 and cfg.class_index(" truck ") == 9
    assert cfg.class_index("7") == 7 and cfg.class_index(0) == 0
    for bad in ("unicorn", 10, "-1"):
        with pytest.raises(ValueError):
            cfg.class_index(bad)
    bare = ModelConfig(name="n", arch="a", source=Source("file", "f"))
    assert bare.class_name(2) == "2"
    with pytest.raises(ValueError):
        bare.class_index("cat")



def test_an_unknown_class_name_suggests_the_classes_meant() -> None:
    # as a mistyped model name does: a label file's "kat" said only "unknown class 'kat'"
    cfg = get_model_config("cifar10-resnet18-std")
    with pytest.raises(ValueError, match=r"^unknown class 'kat' for model cifar10-resnet18-std \(cifar10\)\. "
                                         r"Did you mean 'cat'\?$"):  # fmt: skip
        cfg.class_index("kat")
    with pytest.raises(ValueError) as nothing_close:
        cfg.class_index("unicorn")
    assert "Did you mean" not in str(nothing_close.value)

# -- values checked when the registry is read -------------------------------------------------------------------

MORE_INVALID_ROWS = {
    "num-classes-str": (GOOD + 'num_classes = "ten"\n', "num_classes must be a positive integer"),
    "num-classes-float": (GOOD + "num_classes = 10.5\n", "num_classes must be a positive integer"),
    "num-classes-zero": (GOOD + "num_classes = 0\n", "num_classes must be a positive integer"),
    "num-classes-bool": (GOOD + "num_classes = true\n", "num_classes must be a positive integer"),
    "arch-args-not-table": (GOOD + "arch_args = 3\n", "arch_args must be a table"),
    "arch-args-list": (GOOD + "arch_args = [1, 2]\n", "arch_args must be a table"),
    "mean-too-short": (GOOD + "mean = [0.5, 0.5]\nstd = [0.5, 0.5]\n", "one per input channel"),
    "std-longer-than-gray": (GOOD + "input_size = [1, 28, 28]\nmean = [0.5]\nstd = [0.2, 0.2, 0.2]\n",
                             "one per input channel"),  # fmt: skip
    "std-zero": (GOOD + "mean = [0.5, 0.5, 0.5]\nstd = [0.2, 0, 0.2]\n", "std values must be positive"),
    "timm-pin": ('arch = "resnet18"\nsource = "timm:resnet18.a1_in1k"\n' + f'sha256 = "{"a" * 64}"\n',
                 "sha256 pin cannot be checked on a timm: source"),  # fmt: skip
    "hf-bad-repo-id": ('arch = "x"\nsource = "hf://org/re..po/w.safetensors"\n', "not a valid Hub repo id"),
    "hf-dotdot-file": ('arch = "x"\nsource = "hf://org/m/../m/w.safetensors"\n', "outside its repository"),
    "mean-nan": (GOOD + "mean = [nan, 0.5, 0.5]\nstd = [0.2, 0.2, 0.2]\n", "must be finite"),
    "std-inf": (GOOD + "mean = [0.5, 0.5, 0.5]\nstd = [0.2, inf, 0.2]\n", "must be finite"),
}


@pytest.mark.parametrize("case", [*INVALID_ROWS, *MORE_INVALID_ROWS])
def test_invalid_rows_are_registry_errors_naming_the_file(case: str, tmp_path) -> None:
    body, reason = {**INVALID_ROWS, **MORE_INVALID_ROWS}[case]
    path = _write(tmp_path / f"{case}.toml", f"[models.bad-{case}]\n{body}")
    with pytest.raises(RegistryError) as info:
        load_registry([path])
    message = str(info.value)
    assert str(path) in message
    assert f"bad-{case}" in message or case == "unknown-base"
    assert reason in message, message
    assert info.value.path == path
    assert isinstance(info.value, ValueError)
    if case in MORE_INVALID_ROWS:  # values checked when read: the row named as written, one line
        assert f"'bad-{case}'" in message and "\n" not in message, message


def test_timm_row_takes_classes_and_preprocessing_from_timm(tmp_path) -> None:
    path = _write(tmp_path / "r.toml", '[models.r18]\narch = "resnet18"\nsource = "timm:resnet18.a1_in1k"\n'
                                       '[models.r18-own-size]\narch = "resnet18"\nsource = "timm:resnet18.a1_in1k"\n'
                                       "input_size = [3, 160, 160]\n")  # fmt: skip
    cfg = get_model_config("r18", [path])
    assert cfg.num_classes == 1000  # not a silent 10-way head
    assert cfg.input_size == (3, 224, 224)
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406)) and cfg.std == pytest.approx((0.229, 0.224, 0.225))
    own = get_model_config("r18-own-size", [path])
    assert own.input_size == (3, 160, 160) and own.num_classes == 1000  # what the row gives wins
    # A class list that does not fit the pretrained head is an error, not a random 10-way head.
    bad = _write(tmp_path / "bad.toml", '[models.r18-cifar]\narch = "resnet18"\nsource = "timm:resnet18.a1_in1k"\n'
                                        'classes = "cifar10"\n')  # fmt: skip
    with pytest.raises(RegistryError, match="10 class names for 1000 classes"):
        load_registry([bad])
    unknown = _write(tmp_path / "unknown.toml", '[models.u]\narch = "resnet18"\nsource = "timm:resnet18.no_such_tag"\n')
    with pytest.raises(RegistryError, match="give num_classes"):
        load_registry([unknown])


def test_hf_pin_on_a_moving_revision_warns(tmp_path, caplog) -> None:
    pin = "a" * 64
    commit = "0123456789abcdef0123456789abcdef01234567"
    path = _write(tmp_path / "r.toml", f'[models.main]\narch = "x"\nsource = "hf://org/repo/w.safetensors"\nsha256 = "{pin}"\n'
                                       f'[models.fixed]\narch = "x"\nsource = "hf://org/repo/w.safetensors@{commit}"\n'
                                       f'sha256 = "{pin}"\n'
                                       '[models.unpinned]\narch = "x"\nsource = "hf://org/repo/w.safetensors"\n')  # fmt: skip
    with caplog.at_level("WARNING", logger="preempt_cli.registry"):
        load_registry([path])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "'main'" in lines[0] and "main branch" in lines[0] and "pin a commit" in lines[0] and str(path) in lines[0]


# -- layers: a row hiding a lower one ------------------------------------------------------------------------------


def test_a_row_replacing_a_lower_one_warns_once(isolated_config: Path, tmp_path, caplog) -> None:
    user_file = _write(isolated_config / "preempt" / "models.toml", USER_ROWS)
    extra = _write(tmp_path / "team.toml", '[models.my-robust]\nbase = "my-robust"\nrole = "victim"\n')
    with caplog.at_level("WARNING", logger="preempt_cli.registry"):
        load_registry([extra])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # the user row hiding a built-in; a row based on its own name is deliberate
    assert "'cifar10-resnet20-std'" in lines[0] and str(user_file) in lines[0]
    assert str(builtin_registry_path()) in lines[0] and "\n" not in lines[0]


def test_register_model_refuses_a_builtin_name_unless_forced(tmp_path) -> None:
    from preempt_cli.registry import check_registrable, register_model

    target = tmp_path / "user.toml"
    row = {"arch": "cifar_resnet20", "source": "file:/keys/k.safetensors"}
    with pytest.raises(RegistryError, match="built-in model") as info:
        register_model("preempt-resnet20-at", row, target)
    assert "--overwrite" in str(info.value) and not target.exists()
    with pytest.raises(RegistryError, match="built-in model"):
        check_registrable("cifar10-resnet20-pgdat-a", target)
    assert register_model("preempt-resnet20-at", row, target, overwrite=True) == target
    assert load_registry([target])["preempt-resnet20-at"].source.location == "/keys/k.safetensors"


def test_a_row_naming_a_path_that_is_not_utf8_is_a_registry_error_and_nothing_is_written(tmp_path) -> None:
    # a folder named in another encoding (os.fsdecode gives it surrogates): keygen --out there stopped with
    # "internal error: UnicodeEncodeError", a TOML registry holding UTF-8 text alone
    from preempt_cli.registry import register_model

    target = tmp_path / "user.toml"
    register_model("other", {"arch": "cifar_resnet20", "source": "file:/o.safetensors"}, target)
    before = target.read_bytes()
    folder = os.fsdecode(b"/keys/\xffdir")
    with pytest.raises(RegistryError) as info:
        register_model("k", {"arch": "cifar_resnet20", "source": f"file:{folder}/k.safetensors"}, target)
    message = str(info.value)
    assert "'k'" in message and "not UTF-8" in message and str(target) in message, message
    assert "\\udcff" in message, message  # where: escaped, as the line holding it
    assert target.read_bytes() == before


@pytest.mark.parametrize("name", ["key.v2", "a.b.c", "v1.0-final"])
def test_register_model_with_a_dotted_name_reads_back(name: str, tmp_path) -> None:
    from preempt_cli.registry import register_model

    target = tmp_path / "user.toml"
    register_model("other", {"arch": "cifar_resnet20", "source": "file:/o.safetensors"}, target)
    row = {"arch": "cifar_resnet20", "arch_args": {"shortcut": "pad_end"}, "source": "file:/k1.safetensors"}
    assert register_model(name, row, target) == target
    assert f'[models."{name}"]' in target.read_text()
    models = load_registry([target])
    assert models[name].source.location == "/k1.safetensors" and "other" in models
    with pytest.raises(RegistryError, match="already registered"):
        register_model(name, row, target)
    register_model(name, {**row, "source": "file:/k2.safetensors"}, target, overwrite=True)
    assert target.read_text().count(f'[models."{name}"]') == 1
    assert load_registry([target])[name].source.location == "/k2.safetensors"


@pytest.mark.parametrize("command", ["keygen", "train"])
def test_keygen_and_train_refuse_a_builtin_name_before_training(command: str, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import preempt_cli.cli._train as train_cli
    from preempt_cli.cli import app

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    for fn in ("load_train_data", "keygen", "train"):
        monkeypatch.setattr(train_cli, fn, no_training)
    out = tmp_path / "preempt-resnet20-at.safetensors"
    args = (["keygen", "--base", "cifar10-resnet20-pgdat-a", "--data", str(tmp_path / "data")] if command == "keygen"
            else ["train", str(tmp_path / "data"), "--arch", "cifar_resnet20"])  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "built-in model" in result.output and "preempt-resnet20-at" in result.output
    assert "internal error" not in result.output


# -- base rows and relative paths -----------------------------------------------------------------------------------


def test_inherited_relative_source_resolves_against_the_base_registry(tmp_path) -> None:
    from preempt_cli.hub import resolve_weights
    from safetensors.torch import save_file

    team = _write(tmp_path / "team" / "models.toml", '[models.team-key]\narch = "cifar_resnet20"\n'
                                                     'source = "file:keys/k.safetensors"\n')  # fmt: skip
    (tmp_path / "team" / "keys").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "team" / "keys" / "k.safetensors"))
    mine = _write(tmp_path / "me" / "models.toml", '[models.my-view]\nbase = "team-key"\nrole = "victim"\n'
                                                   '[models.my-own]\nbase = "team-key"\nsource = "file:keys/k.safetensors"\n')  # fmt: skip
    view = get_model_config("my-view", [team, mine])
    assert view.registry_file == mine and view.source_anchor == team
    assert resolve_weights(view) == tmp_path / "team" / "keys" / "k.safetensors"
    own = get_model_config("my-own", [team, mine])
    assert own.source_anchor == mine  # a source written in this file is relative to this file
    with pytest.raises(Exception, match="not found"):
        resolve_weights(own)


def test_register_model_replaces_a_commented_header_and_keeps_the_next_rows_comments(tmp_path) -> None:
    """``[models.mk]  # my key`` was not recognised (the re-registration then wrote a second table: invalid
    TOML, after the training); the comment above the next row was removed with the row replaced."""
    from preempt_cli.registry import check_registrable, register_model

    target = tmp_path / "user.toml"
    target.write_text('[models.mk]  # my key\narch = "cifar_resnet20"\nsource = "file:/old.safetensors"\n\n'
                      '# --- my other important model (keep!) ---\n[models.other]\narch = "cifar_resnet20"\n'
                      'source = "file:/o.safetensors"\n')  # fmt: skip
    register_model("mk", {"arch": "cifar_resnet20", "source": "file:/new.safetensors"}, target, overwrite=True)
    text = target.read_text()
    assert "# --- my other important model (keep!) ---\n[models.other]" in text and text.count("[models.mk]") == 1
    models = load_registry([target])
    assert models["mk"].source.location == "/new.safetensors" and models["other"].source.location == "/o.safetensors"
    # a row preempt cannot replace is found before any work, not after the training it would register
    target.write_text('[models]\nmk = { arch = "cifar_resnet20", source = "file:/old.safetensors" }\n')
    with pytest.raises(RegistryError, match="cannot replace"):
        check_registrable("mk", target, overwrite=True)


@pytest.mark.parametrize("notes", ['"""\n[1] trained on a subset\n"""', "'''\n[models.other]\n'''",
                                   '"""a \\""" [x]\n[2] ok"""', '"[ not a table"'])  # fmt: skip
def test_register_model_replaces_a_row_whose_strings_hold_lines_like_headers(tmp_path, notes) -> None:
    """A line of a multi-line string that starts with ``[`` was taken for a table header: the row was cut
    there, and the re-registration (``train --force``) ended in an internal TOMLDecodeError."""
    from preempt_cli.registry import register_model

    target = tmp_path / "user.toml"
    other = '# keep\n[models.other]\narch = "cifar_resnet20"\nsource = "file:/o.safetensors"\nnotes = """\n[3]\n"""\n'
    target.write_text(f'[models.mk]\narch = "cifar_resnet20"\nsource = "file:/old.safetensors"\nnotes = {notes}\n\n{other}')
    register_model("mk", {"arch": "cifar_resnet20", "source": "file:/new.safetensors"}, target, overwrite=True)
    models = load_registry([target])
    assert models["mk"].source.location == "/new.safetensors" and models["mk"].notes == ""
    assert models["other"].notes == "[3]\n" and "# keep\n[models.other]" in target.read_text()


def test_a_row_that_cannot_be_removed_line_by_line_is_refused_with_the_file_kept(tmp_path) -> None:
    # a dotted-key form the line-based removal cannot take apart: refused, nothing written
    from preempt_cli.registry import check_registrable

    target = tmp_path / "user.toml"
    text = '[models.mk]\narch = "cifar_resnet20"\nsource = "file:/old.safetensors"\n[models.mk.arch_args]\nshortcut = "pad_end"\n'
    target.write_text(text)
    with pytest.raises(RegistryError, match="edit the file by hand"):
        check_registrable("mk", target, overwrite=True)
    assert target.read_text() == text


@pytest.mark.parametrize("broken, said", [("[models.other\n", "cannot be removed from it line by line: edit"),
                                           ("", "without changing other entries: edit")])  # fmt: skip
def test_a_removal_that_would_break_or_change_the_rest_is_refused(tmp_path, monkeypatch, broken, said) -> None:
    # the guard behind the line-based removal: text that no longer parses, or parses to other entries
    from preempt_cli import registry as registry_module

    target = tmp_path / "user.toml"
    text = '[models.mk]\narch = "cifar_resnet20"\nsource = "file:/a.safetensors"\n\n[models.other]\narch = "x"\nsource = "file:/o.safetensors"\n'
    target.write_text(text)
    monkeypatch.setattr(registry_module, "_without_row", lambda text, name: broken)
    with pytest.raises(RegistryError, match=said):
        registry_module.check_registrable("mk", target, overwrite=True)
    assert target.read_text() == text


def test_registrations_at_once_keep_every_row(tmp_path) -> None:
    """Two jobs registering at the same time each wrote back the file they had read: 49 of 80 rows were kept."""
    import subprocess
    import sys

    target = tmp_path / "user.toml"
    script = ("import sys\nfrom preempt_cli.registry import register_model\n"
              "for i in range(15):\n"
              "    register_model(f'{sys.argv[1]}{i}', {'arch': 'cifar_resnet20', 'source': 'file:/k.safetensors'}, "
              f"__import__('pathlib').Path({str(target)!r}))\n")  # fmt: skip
    jobs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("a", "b")]
    assert [job.wait(timeout=240) for job in jobs] == [0, 0]
    names = set(load_registry([target]))
    assert {f"{tag}{i}" for tag in "ab" for i in range(15)} <= names


def test_a_row_that_changes_the_class_count_of_its_base_drops_the_bases_class_names(tmp_path) -> None:
    """``base = "cifar10-resnet20-pgdat-a"`` with ``num_classes = 100`` failed: "10 class names for 100
    classes", names the row never gave (the base's, inherited)."""
    path = _write(tmp_path / "r.toml", '[models.c100]\nbase = "cifar10-resnet20-pgdat-a"\nnum_classes = 100\n'
                                       '[models.same]\nbase = "cifar10-resnet20-pgdat-a"\nnum_classes = 10\n')  # fmt: skip
    models = load_registry([path])
    assert models["c100"].num_classes == 100 and models["c100"].classes is None
    assert models["same"].classes == models["cifar10-resnet20-pgdat-a"].classes  # same count: names kept


def test_builtin_class_sets_are_the_registry_files_own() -> None:
    """``train`` names a dataset by the built-in class set its folders match; the sets come from
    models.toml's [classes], as tuples in the file's order, and every built-in row's names are one of them."""
    sets = builtin_class_sets()
    assert sets["cifar10"] == CIFAR10
    named = {cfg.classes for cfg in load_registry().values() if cfg.classes}
    assert named and named <= set(sets.values())


@pytest.mark.parametrize(("edited", "said"), [
    ("# mine\n[models.half\n", "not valid TOML: Expected ']'"),
    ("models = 3\n", "'models' must be a table ([models.NAME]), got 3"),
])  # fmt: skip
def test_a_registry_edited_by_hand_while_registering_is_refused_and_left_as_it_is(tmp_path, monkeypatch, edited,
                                                                                   said) -> None:  # fmt: skip
    """Checked before the work, the registry was read again under the lock unchecked: a hand edit meanwhile
    (a half-done one) ended in an internal TOMLDecodeError or TypeError instead of naming the file."""
    from preempt_cli import registry as registry_module

    target = _write(tmp_path / "user.toml", "# mine\n")
    real_lock = registry_module._registry_lock

    @contextlib.contextmanager
    def edited_then_locked(path):
        target.write_text(edited)  # between the check and the lock
        with real_lock(path):
            yield

    monkeypatch.setattr(registry_module, "_registry_lock", edited_then_locked)
    with pytest.raises(RegistryError, match=re.escape(said)) as info:
        register_model("k", {"arch": "cifar_resnet20", "source": "file:/k.safetensors"}, target)
    assert info.value.path == target and "\n" not in str(info.value)
    assert target.read_text() == edited


def test_a_registry_read_while_others_register_is_never_half_written(tmp_path) -> None:
    """Registrations replace the file whole (under a lock, atomically): a reader meanwhile sees the rows of
    before or of after, never a file cut short (threads here; processes in the test above)."""
    import threading

    target = _write(tmp_path / "user.toml", "# mine\n")
    row = {"arch": "cifar_resnet20", "source": "file:/k.safetensors", "description": "x" * 2000}
    names = [f"k{i}" for i in range(40)]
    writers = [threading.Thread(target=lambda part: [register_model(n, row, target) for n in part], args=(part,))
               for part in (names[::2], names[1::2])]  # fmt: skip
    for writer in writers:
        writer.start()
    seen = 0
    while any(writer.is_alive() for writer in writers):
        rows = set(load_registry([target])) & set(names)  # raises on a file cut short
        assert len(rows) >= seen  # rows are never lost either
        seen = len(rows)
    for writer in writers:
        writer.join()
    assert set(names) <= set(load_registry([target]))
