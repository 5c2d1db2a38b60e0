"""``preempt eval``: what it writes (strict JSON, ``null`` for values not measured), the inputs it refuses
(attack ``limit=``, ``--jpeg-quality``, options a run would ignore, defense values), damaged ``--resume``
state, what a ``folder:`` defense takes, its own output inside the data, and images too small for SSIM, on tiny
models (no ``../shared``)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TEST_DEVICE, TEST_DEVICE_ARG, make_tiny_model, write_random_pngs
from preempt_cli.cli import app
from preempt_cli.errors import ConfigError
from preempt_cli.evaluate import AttackSpec, Dataset, DefenseSpec, Evaluator, jpeg_roundtrip
from preempt_cli.models import create_arch


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses ``NaN`` and ``Infinity`` (what strict JSON readers do)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with one small random-weight CIFAR-10 model, ``tiny-victim``."""
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "victim.safetensors"))
    (root / "models.toml").write_text('[models.tiny-victim]\narch = "cifar_resnet20"\narch_args = { shortcut = '
                                      '"pad_end" }\nclasses = "cifar10"\nsource = "file:victim.safetensors"\n')  # fmt: skip
    return root / "models.toml"


# -- 1. values not measured are null, and every JSON eval writes is strict ---------------------------------------
def test_a_folder_defense_time_is_null_not_nan_in_every_output(tmp_path: Path, registry: Path) -> None:
    data, prot, out, csv_path = tmp_path / "data", tmp_path / "prot", tmp_path / "ev", tmp_path / "rows.csv"
    for i, cls in enumerate(("cat", "dog")):
        write_random_pngs(data / cls, n=2, seed=i)
        write_random_pngs(prot / cls, n=2, seed=10 + i)  # "protected elsewhere": no time of theirs is measured here
    args = ["eval", str(data), "--victim", "tiny-victim", "-b", "tiny-victim", "--defense", f"folder:{prot}",
            "--attack", "pgd:steps=1", "--device", TEST_DEVICE_ARG, "--json", "--csv", str(csv_path), "--out",
            str(out), "--registry", str(registry)]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert strict_loads(line)["seconds_per_image"] is None
    assert strict_loads((out / "results.json").read_text())[0]["seconds_per_image"] is None
    (cell,) = (out / "cells").glob("*.json")
    assert strict_loads(cell.read_text())["seconds_per_image"] is None
    with csv_path.open(newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["seconds_per_image"] == "" and "nan" not in csv_path.read_text().lower()
    assert "| - |" in (out / "report.md").read_text()

    # A cell written by 0.9.0 (NaN for the value not measured) is resumed as null, and so is the defense.
    cell.write_text(cell.read_text().replace('"seconds_per_image": null', '"seconds_per_image": NaN'))
    again = invoke([*args, "--resume"])
    assert again.exit_code == 0, again.stderr
    assert strict_loads(again.stdout.splitlines()[0])["seconds_per_image"] is None
    assert strict_loads((out / "results.json").read_text())[0]["seconds_per_image"] is None


def test_eval_json_refuses_nan() -> None:
    from preempt_cli.evaluate import json_dumps

    assert json_dumps({"seconds_per_image": None}) == '{"seconds_per_image": null}'
    with pytest.raises(ValueError):
        json_dumps({"seconds_per_image": float("nan")})


# -- 2. an attack's own limit= --------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["-3", "0", "abc", "1.5"])
def test_attack_limit_below_one_is_a_usage_error(tmp_path: Path, limit: str) -> None:
    text = f"pgd:steps=1,limit={limit}"
    with pytest.raises(ConfigError, match="limit must be"):
        AttackSpec.parse(text)
    with pytest.raises(ConfigError, match="limit must be"):
        AttackSpec.parse(f"aa:limit={limit}")
    result = invoke(["eval", str(tmp_path), "--victim", "x", "-b", "y", "--out", str(tmp_path / "o"), "--attack", text])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: --attack {text}: limit must be") and "internal error" not in line


def test_attack_limit_of_one_or_more_is_kept() -> None:
    assert AttackSpec.parse("pgd:limit=1").limit == 1
    assert AttackSpec.parse("aa:limit=50").name.endswith("(first 50)")
    assert AttackSpec.parse("pgd").limit is None


# -- 3. damaged resume state ---------------------------------------------------------------------------------
def _evaluator(out: Path, resume: bool) -> Evaluator:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    ds = Dataset(Path("mem"), [Path(f"mem/{i:03d}.png") for i in range(4)], images, torch.tensor([0, 1, 2, 3]))
    models = {"victim": make_tiny_model(4, name="victim").to(TEST_DEVICE),
              "bb": make_tiny_model(0, name="bb").to(TEST_DEVICE)}  # fmt: skip
    return Evaluator(ds, load=models.__getitem__, device=TEST_DEVICE, batch_size=4, out_dir=out, resume=resume)


FP = DefenseSpec("fast-preemption", (("backbone", "bb"), ("labels", "backbone"), ("samples", "2")))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _wrong_images(path: Path) -> None:
    torch.save({"images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "seconds_per_image": 0.1}, path)


@pytest.mark.parametrize(
    ("folder", "damage"),
    [
        ("defenses", _truncate),
        ("defenses", lambda p: p.write_bytes(b"")),
        ("defenses", _wrong_images),
        ("cells", _truncate),
        ("cells", lambda p: p.write_text("[]")),
        ("cells", lambda p: p.write_text('{"victim": "victim"}')),
    ],
)
def test_a_damaged_resume_file_is_computed_again_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, folder: str, damage: Any
) -> None:
    first = _evaluator(tmp_path, resume=False)
    row = first.cell("victim", FP, None)
    images = first.defend(FP).images
    (path,) = (tmp_path / folder).glob("*")
    damage(path)
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        again = _evaluator(tmp_path, resume=True)
        resumed = again.defend(FP).images if folder == "defenses" else again.cell("victim", FP, None)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning and "computing that" in warning and "\n" not in warning
    if folder == "defenses":
        assert torch.equal(resumed, images)
        assert torch.equal(torch.load(path, weights_only=True)["images"], images)  # the file is whole again
    else:
        assert {k: resumed[k] for k in ("n", "clean_acc", "robust_acc")} == {k: row[k] for k in ("n", "clean_acc", "robust_acc")}
        assert strict_loads(path.read_text())["clean_acc"] == row["clean_acc"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):  # repaired: resumed without a word
        _evaluator(tmp_path, resume=True).cell("victim", FP, None)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_resumed_run_names_who_computed_what_it_took(tmp_path: Path) -> None:
    """run.json credited results taken from --out to the run that resumed them (another release, another
    device); each defended set and cell now keeps its own record, and provenance() counts and names them."""
    first = _evaluator(tmp_path, resume=False)
    first.cell("victim", FP, None)
    assert first.provenance(["victim"])["resumed"] == {"defenses": 0, "cells": 0}
    (cache,) = (tmp_path / "defenses").glob("*")
    assert torch.load(cache, weights_only=True)["computed_by"] == first.computed_by()  # readable weights-only
    (cell,) = (tmp_path / "cells").glob("*")
    cell.write_text(cell.read_text().replace(first.computed_by()["device"], "cuda:0 (a GPU)"))
    again = _evaluator(tmp_path, resume=True)
    again.defend(FP)
    row = again.cell("victim", FP, None)
    assert "computed_by" not in row  # the row is the row
    record = again.provenance(["victim"])
    assert record["resumed"] == {"defenses": 1, "cells": 1}
    assert sorted(o["device"] for o in record["computed_by"]) == sorted([first.computed_by()["device"], "cuda:0 (a GPU)"])


# -- 4. --jpeg-quality, and options a run would ignore --------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reversion", "--jpeg-quality", "500"], "--jpeg-quality must be a whole number in 1..100"),
        (["--reversion", "--jpeg-quality", "-5"], "--jpeg-quality must be a whole number in 1..100"),
        (["--reversion", "--jpeg-quality", "0"], "--jpeg-quality must be a whole number in 1..100"),
        (["--flip-fraction", "0.5"], "--flip-fraction only applies with --reversion"),
        (["--jpeg-quality", "60"], "--jpeg-quality only applies with --reversion"),
        (["--reversion-backbone", "z", "--reversion-labels", "own"], "--reversion-backbone, --reversion-labels only "
                                                                     "apply with --reversion"),
        (["--reversion", "--attack", "pgd"], "--reversion does not use --attack"),
        (["--reversion", "--csv", "{tmp}/x.csv", "--resume"], "--reversion does not use --csv, --resume"),
        (["--reversion", "--flip-fraction", "2"], "--flip-fraction must be in [0, 1]"),
        (["--reversion", "--flip-fraction", "0.5", "-c", "z"], "it does not use a classifier (-c/--classifier)"),
        (["--reversion", "--flip-fraction", "0.5", "--defense", "fp:classifier=z"],
         "it does not use a classifier (--defense fp:classifier=z)"),
        (["--reversion", "--flip-fraction", "0.5", "--defense", "fp:labels=backbone"],
         "--flip-fraction labels the defense with flipped ground truth, not labels=backbone; drop labels="),
    ],
)
def test_eval_refuses_out_of_range_and_ignored_options(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke(["eval", str(tmp_path), "--victim", "x", "-b", "y", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line


@pytest.mark.parametrize("quality", ["1", "100"])
def test_eval_takes_jpeg_qualities_1_to_100(tmp_path: Path, quality: str) -> None:
    result = invoke(["eval", str(tmp_path), "--victim", "no-such-model", "-b", "y", "--out", str(tmp_path / "o"),
                     "--reversion", "--jpeg-quality", quality])  # fmt: skip
    assert result.exit_code == 2 and "no-such-model" in result.stderr and "--jpeg-quality" not in result.stderr


def test_jpeg_roundtrip_refuses_a_quality_pillow_would_clamp() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert jpeg_roundtrip(images, 100).shape == images.shape
    for quality in (0, 101, -5):
        with pytest.raises(ConfigError, match="1..100"):
            jpeg_roundtrip(images, quality)


def test_an_interrupted_eval_says_that_resume_keeps_the_finished_cells(tmp_path: Path, registry: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A plain re-run computes every cell again: the message must point at --resume, not at "run again"."""
    data = tmp_path / "data"
    write_random_pngs(data / "cat", n=2)

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Evaluator, "grid", interrupted)
    result = CliRunner().invoke(app, ["eval", str(data), "--victim", "tiny-victim", "--defense", "none",
                                      "--attack", "pgd:steps=1", "--device", TEST_DEVICE_ARG, "--out",
                                      str(tmp_path / "ev"), "--registry", str(registry)])  # fmt: skip
    assert result.exit_code == 130 and "--resume" in result.output, result.output


def test_load_dataset_refuses_16_bit_images_and_limits_that_are_not_whole(tmp_path: Path) -> None:
    """16-bit files were wrapped modulo 256 into the uint8 dataset (35966 became 126): refused, naming the
    file; ``limit=2.5`` failed inside slicing and ``limit=True`` meant 1."""
    import numpy as np
    from PIL import Image

    from preempt_cli.evaluate import load_dataset

    (tmp_path / "cat").mkdir()
    Image.fromarray(np.full((4, 4), 35966, dtype=np.uint16)).save(tmp_path / "cat" / "0.png")
    with pytest.raises(ConfigError, match=r"0\.png: a 16-bit image"):
        load_dataset(tmp_path, classes=["cat"])
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "cat" / "0.png")
    data = load_dataset(tmp_path, classes=["cat"])
    assert data.images.dtype == torch.uint8 and data.images[0, :, 0, 0].tolist() == [1, 2, 3]
    for limit in (2.5, True, 0, "1"):
        with pytest.raises(ConfigError, match="limit"):
            load_dataset(tmp_path, classes=["cat"], limit=limit)  # type: ignore[arg-type]
    assert len(load_dataset(tmp_path, classes=["cat"], limit=5).images) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--victim", "x"], "--victim x is given twice: give it once"),
        (["--defense", "none", "--defense", "none"], "--defense none is given twice: give it once"),
        (["--defense", "fp", "--defense", "fp:seed=0"], "--defense fp and --defense fp:seed=0 are the same"),
        (["--attack", "pgd", "--attack", "pgd:steps=20"], "--attack pgd and --attack pgd:steps=20 are the same"),
        (["--attack", "aa", "--attack", "AA:version=standard"], "--attack aa and --attack AA:version=standard are"),
    ],
)
def test_eval_refuses_a_victim_defense_or_attack_given_twice(tmp_path: Path, args: list[str], message: str) -> None:
    """Each cell of a victim, defense or attack given twice was computed twice (an AutoAttack of hours again),
    into two rows alike in the table, the results and the CSV."""
    result = invoke(["eval", str(tmp_path), "--victim", "x", "-b", "y", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line


def test_eval_takes_attacks_and_defenses_that_differ_in_one_setting(tmp_path: Path, registry: Path) -> None:
    data = tmp_path / "data"
    write_random_pngs(data / "cat", n=2)
    result = invoke(["eval", str(data), "--victim", "tiny-victim", "--defense", "none", "--attack", "pgd:steps=1",
                     "--attack", "pgd:steps=1,eps=4/255", "--attack", "pgd:steps=1,eps=8/255", "--device",
                     TEST_DEVICE_ARG, "--out", str(tmp_path / "ev"), "--registry", str(registry), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(strict_loads((tmp_path / "ev" / "results.json").read_text())) == 3


# -- 5. a folder defense takes defended images, never the originals ---------------------------------------------
def _protect(registry: Path, *args: str) -> None:
    result = invoke(["protect", *args, "--samples", "1", "-b", "tiny-victim", "--labels", "backbone", "--device",
                     TEST_DEVICE_ARG, "-q", "--registry", str(registry)])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_folder_defense_takes_preempt_s_outputs_never_the_originals_beside_them(tmp_path: Path,
                                                                                  registry: Path) -> None:  # fmt: skip
    """Two classes of three protected in a copy of the data: eval took the third's originals, left in the
    copy, for defended images (n=6, no word). An image without an output is an error, as one without any
    file is, even where its unmarked file there is not a byte copy; an output is found under any suffix."""
    data, prot = tmp_path / "data", tmp_path / "prot"
    for i, cls in enumerate(("cat", "dog", "ship")):
        write_random_pngs(data / cls, n=2, seed=i)
    shutil.copytree(data, prot)
    write_random_pngs(prot / "ship", n=1, seed=9)  # ship/img0.png: no copy, but no preempt output either
    _protect(registry, str(prot / "cat"), str(prot / "dog"))
    args = ["eval", str(data), "--victim", "tiny-victim", "--defense", f"folder:{prot}", "--attack", "pgd:steps=1",
            "--device", TEST_DEVICE_ARG, "--json", "--out", str(tmp_path / "ev"),
            "--registry", str(registry)]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line == (f"error: folder defense: no output of preempt protect made from {Path('ship', 'img0.png')} in "
                    f"{prot} (2 of the 6 images have none)")  # fmt: skip

    shutil.copy(data / "ship" / "img0.png", prot / "ship" / "img0.png")
    _protect(registry, str(prot / "ship"), "--suffix", "_safe")  # found by the original its metadata records
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["n"] == 6
    (cache,) = (tmp_path / "ev" / "defenses").glob("*.pt")
    defended = torch.load(cache, weights_only=True)["images"]
    order = sorted(data.rglob("*.png"), key=lambda p: (p.name, str(p)))  # the dataset's order
    suffix = {"cat": ".protected", "dog": ".protected", "ship": "_safe"}
    for image, original in zip(defended, order):
        output = prot / original.parent.name / f"{original.stem}{suffix[original.parent.name]}.png"
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(output))))
        assert not torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(original))))


def test_a_folder_defense_of_another_tool_refuses_copies_of_the_originals(tmp_path: Path) -> None:
    """In a folder without preempt's outputs, another tool's files of the images' names are the defended
    images; one with the original's pixels (a copy, byte for byte or saved again) is an error."""
    from preempt_cli.evaluate import load_dataset

    data, other = tmp_path / "data", tmp_path / "other"
    write_random_pngs(data / "cat", n=2, seed=0)
    write_random_pngs(other / "cat", n=2, seed=5)
    dataset = load_dataset(data, classes=["cat"])
    spec = DefenseSpec.parse(f"folder:{other}")

    def evaluator() -> Evaluator:  # its resume state in the folder
        return Evaluator(dataset, load={}.__getitem__, device=TEST_DEVICE, out_dir=other / "ev", resume=True)

    def defend() -> torch.Tensor:
        return evaluator().defend(spec).images

    key = evaluator().defense_key(spec)
    assert torch.equal(defend(), load_dataset(other, classes=["cat"]).images)  # its resume state written there
    write_random_pngs(other / "ev", n=1, name=f"perturbation_{spec.key}.png")  # and a report's map
    assert evaluator().defense_key(spec) == key  # neither changes what the folder holds: --resume reuses it
    shutil.copy(data / "cat" / "img1.png", other / "cat" / "img1.png")
    message = f"^folder defense: {other / 'cat' / 'img1.png'} has the pixels of {data / 'cat' / 'img1.png'}: a copy of"
    with pytest.raises(ConfigError, match=message):
        defend()
    Image.open(data / "cat" / "img1.png").save(other / "cat" / "img1.png", compress_level=0)  # other bytes
    assert (other / "cat" / "img1.png").read_bytes() != (data / "cat" / "img1.png").read_bytes()
    with pytest.raises(ConfigError, match=message):
        defend()


# -- 6. defense values are read when parsed ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", "fp:samples=abc"], "--defense fp:samples=abc: samples must be a whole number >= 1, got 'abc'"),
        (["--defense", "fp:samples=0"], "--defense fp:samples=0: samples must be a whole number >= 1, got '0'"),
        (["--defense", "fp:seed=abc"], "--defense fp:seed=abc: seed must be a whole number >= 0, got 'abc'"),
        (["--defense", "fp:seed=18446744073709551616"], "seed must be in 0..2**64-1"),
        (["--defense", "fp:forward=1.5"], "--defense fp:forward=1.5: forward must be a whole number >= 0, got '1.5'"),
        (["--defense", "fp:forward=0,backward=0"], "at least one forward or backward step is needed"),
        (["--defense", "fp:eta=-1"], "--defense fp:eta=-1: eta must be a positive number"),
        (["--defense", "fp:eps=9000"], "--defense fp:eps=9000: eps '9000' is more than 255 levels"),
        (["--defense", "fp:preset=fast"], "--defense fp:preset=fast: unknown preset 'fast'"),
        (["--defense", "fp:precision=fp16"], "--defense fp:precision=fp16: precision must be one of fp32, bf16, auto, "
                                             "got 'fp16'"),
        (["--defense", "fp:compile=yes"], "compile must be one of off, default, reduce-overhead, max-autotune"),
        (["--defense", "fp:labels=guess"], "--defense fp:labels=guess: labels must be one of classifier, backbone"),
        (["--defense", "fp:classifier="], "--defense fp:classifier=: classifier= needs a value"),
        (["--defense", "bilevel:eta=abc"], "--defense bilevel:eta=abc: eta must be a number, got 'abc'"),
        (["--defense", "bilevel:steps=0"], "--defense bilevel:steps=0: steps must be a whole number >= 1, got '0'"),
        (["--defense", "bilevel:inner_steps=x"], "inner_steps must be a whole number >= 1, got 'x'"),
        (["--defense", "bilevel:optimizer=adam"], "optimizer must be one of sign, rmsprop, got 'adam'"),
        (["--defense", "folder:{tmp}/nowhere"], "--defense folder:{tmp}/nowhere: {tmp}/nowhere is not a folder"),
        (["--seed", "-1"], "--seed: seed must be in 0..2**64-1, got -1"),
    ],
)
def test_a_bad_defense_value_is_a_usage_error_before_any_model_loads(tmp_path: Path, args: list[str],
                                                                     message: str) -> None:  # fmt: skip
    """Such values ended the run with "internal error: ValueError", after the models loaded and the earlier
    defenses ran; the victim here does not exist, so any later check would name it instead."""
    args, message = [a.replace("{tmp}", str(tmp_path)) for a in args], message.replace("{tmp}", str(tmp_path))
    result = invoke(["eval", str(tmp_path), "--victim", "no-such-model", "-b", "y", "--out", str(tmp_path / "o"),
                     "--defense", "none", *args])  # fmt: skip
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line and "no-such-model" not in line
    if args[0] == "--defense" and not args[1].startswith("folder"):  # the library refuses them, as said
        with pytest.raises(ConfigError) as refused:
            DefenseSpec.parse(args[1], {"backbone": "bb"})
        assert line.endswith(f": {refused.value}")


def test_defense_values_are_read_as_their_types() -> None:
    spec = DefenseSpec.parse("fp:eps=4,eta=0.5,forward=0,backward=3,samples=2,inner_steps=2,seed=7", {"backbone": "bb"})
    assert (spec.value("seed"), spec.value("samples"), spec.value("eps")) == (7, 2, 4 / 255)
    config = spec.settings("cifar10")
    assert (config.eps, config.eta, config.forward_steps, config.backward_steps) == (4 / 255, 0.5, 0, 3)
    assert (config.samples, config.inner_steps) == (2, 2)
    assert DefenseSpec.parse("fp", {"backbone": "bb"}).value("seed", 0) == 0


# -- 7. eval's output inside the data -----------------------------------------------------------------------------
@pytest.mark.parametrize("out", [None, "cat/ev", "."])
def test_eval_s_output_in_the_data_folder_is_never_read_as_data(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch, out: str | None
) -> None:
    """Run in the data folder, eval wrote its report (a perturbation map, a PNG) into the data, and every later
    run failed on it ("preempt-eval/perturbation_....png: unknown class 'preempt-eval'"), whatever --out."""
    data = tmp_path / "data"
    write_random_pngs(data / "cat", n=2)
    write_random_pngs(data / "dog", n=2, seed=1)
    monkeypatch.chdir(data)
    args = ["eval", ".", "--victim", "tiny-victim", "-b", "tiny-victim", "--defense", "none", "--defense",
            "fp:samples=1,labels=backbone", "--attack", "pgd:steps=1", "--device", TEST_DEVICE_ARG, "--json",
            "--registry", str(registry), *(["--out", out] if out else [])]  # fmt: skip
    first = invoke(args)
    assert first.exit_code == 0, first.stderr
    assert len(list(Path(out or "preempt-eval").glob("perturbation_*.png"))) == 1  # an image in the data folder
    for extra in (["--resume"], []):
        again = invoke([*args, *extra])
        assert again.exit_code == 0, again.stderr
        assert [json.loads(row)["n"] for row in again.stdout.splitlines()] == [4, 4]


# -- 8. the data's size, its labels, and the units of the table --------------------------------------------------
def test_a_limit_above_the_data_is_warned_of_and_a_negative_label_refused(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """``--limit 1000`` on 932 images evaluated 932 without a word; a JSON label of -1 was taken, scored as
    wrong by every model (the reversion protocol) or refused by the first attack, after the defenses ran."""
    from preempt_cli.errors import LabelError
    from preempt_cli.evaluate import load_dataset

    write_random_pngs(tmp_path / "data" / "cat", n=2, seed=0)
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        assert len(load_dataset(tmp_path / "data", classes=["cat"], limit=5)) == 2
    assert any("limit 5 is more than the 2 images" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        load_dataset(tmp_path / "data", classes=["cat"], limit=2)
    assert not caplog.records

    flat = tmp_path / "flat"
    write_random_pngs(flat, n=2, seed=1)
    names = sorted(p.name for p in flat.iterdir())
    (tmp_path / "labels.json").write_text(json.dumps({names[0]: 0, names[1]: -1}))
    with pytest.raises(LabelError, match="label -1 is no class index"):
        load_dataset(flat, classes=None, labels_file=tmp_path / "labels.json")


def test_the_table_and_the_report_say_the_units_of_their_columns(tmp_path: Path, registry: Path) -> None:
    """The table's accuracies had no unit, and no output said what linf was measured in ([0, 1] or levels)."""
    write_random_pngs(tmp_path / "data" / "cat", n=2, seed=0)
    args = ["eval", str(tmp_path / "data"), "--victim", "tiny-victim", "-b", "tiny-victim", "--defense", "none",
            "--attack", "pgd:steps=1", "--device", TEST_DEVICE_ARG, "--out", str(tmp_path / "ev"), "--registry",
            str(registry)]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "400"})  # no header cut short
    assert result.exit_code == 0, result.stderr
    table = " ".join(result.stdout.split())
    assert "clean acc (%)" in table and "robust acc (%)" in table and "in [0, 1] units" in table
    assert "in [0, 1] units" in (tmp_path / "ev" / "report.md").read_text()


# -- 9. each defense paired with none on the same images ------------------------------------------------------
class _LevelSum(torch.nn.Module):
    """A victim whose answer moves with any change of the pixels: the sum of the 8-bit levels, mod 10. Its
    gradient is zero (kept in the graph only so that PGD runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = torch.round(x * 255).flatten(1).sum(1).long()
        return torch.nn.functional.one_hot(levels % 10, 10).float() + 0 * x.flatten(1).sum(1, keepdim=True)


def _bits(text: str) -> torch.Tensor:
    return torch.tensor([b == "1" for b in text], dtype=torch.bool)


def test_each_defense_is_tested_against_none_on_the_same_images_and_a_resume_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report.md gave each cell's accuracy with its Wilson interval, and no cell kept which images it got
    right: what protection buys, a difference on the same images, was not tested. Each defense is now paired
    with none (per victim, clean and each attack): gained and lost images and the exact McNemar p, from the
    per-image correctness each cell file keeps; a cell resumed from a file that keeps none says n/a, why."""
    from conftest import tiny_config
    from preempt_cli.evaluate import holm_adjusted, mcnemar_exact
    from preempt_cli.models import ImageModel

    victim = ImageModel(_LevelSum(), tiny_config("sum-victim")).eval().to(TEST_DEVICE)
    monkeypatch.setattr("preempt_cli.cli._eval._model_cache", lambda *args: {"sum-victim": victim}.__getitem__)
    data, prot, out = tmp_path / "data", tmp_path / "prot", tmp_path / "ev"
    prot.mkdir()
    rng = np.random.default_rng(1)
    labels, expected = {}, {"gained": 0, "lost": 0}
    for i, path in enumerate(write_random_pngs(data, n=24)):
        levels = np.asarray(Image.open(path)).astype(np.int64)
        changed = np.clip(levels + rng.integers(-2, 3, levels.shape), 0, 255)
        Image.fromarray(changed.astype(np.uint8)).save(prot / path.name)  # another tool's defended image
        before, after = int(levels.sum() % 10), int(changed.sum() % 10)
        # the originals' answer on every third image, the defended ones' on the others: where the two differ,
        # the first is right only without the defense (lost), the others only with it (gained)
        labels[path.name] = before if i % 3 == 0 else after
        if before != after:
            expected["lost" if i % 3 == 0 else "gained"] += 1
    assert expected["gained"] > expected["lost"] > 2
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    args = ["eval", str(data), "--labels-file", str(tmp_path / "labels.json"), "--victim", "sum-victim",
            "--defense", "none", "--defense", f"folder:{prot}", "--attack", "pgd:steps=1", "--attack",
            "pgd:steps=1,limit=10", "--device", TEST_DEVICE_ARG, "--out", str(out)]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.stderr

    paired = strict_loads((out / "paired.json").read_text())
    assert "McNemar" in paired["test"]
    pairs = paired["pairs"]
    full, limited = "PGD-1 Linf 8/255", "PGD-1 Linf 8/255 (first 10)"
    assert [(p["metric"], p["attack"], p["n"]) for p in pairs] == [("clean_acc", full, 24), ("robust_acc", full, 24),
                                                                   ("robust_acc", limited, 10)]  # fmt: skip
    assert (pairs[0]["gained"], pairs[0]["lost"]) == (expected["gained"], expected["lost"])
    assert pairs[0]["gain_points"] == round(100 * (expected["gained"] - expected["lost"]) / 24, 2)
    cells = {(c["defense"], c["attack"]): c for c in (strict_loads(p.read_text()) for p in (out / "cells").glob("*"))}
    defense = f"folder:{prot}"
    rows = {(r["defense"], r["attack"]): r for r in strict_loads((out / "results.json").read_text())}
    report = (out / "report.md").read_text()
    assert "## Paired with no defense" in report
    for pair in pairs:
        key = "clean_correct" if pair["metric"] == "clean_acc" else "robust_correct"
        none_ok = _bits(cells[("none", pair["attack"])][key])
        defended_ok = _bits(cells[(defense, pair["attack"])][key])
        assert len(none_ok) == len(defended_ok) == pair["n"]
        assert pair["gained"] == int((defended_ok & ~none_ok).sum())
        assert pair["lost"] == int((none_ok & ~defended_ok).sum())
        assert (pair["gained"], pair["lost"], pair["p_value"]) == mcnemar_exact(none_ok, defended_ok)
        assert pair["none_acc"] == rows[("none", pair["attack"])][pair["metric"]] and pair["not_tested"] is None
        assert pair["defense_acc"] == rows[(defense, pair["attack"])][pair["metric"]]
        metric = "clean" if pair["metric"] == "clean_acc" else f"robust, {pair['attack']}"
        (line,) = [x for x in report.splitlines() if x.startswith(f"| sum-victim | {defense} | {metric} |")]
        assert line.endswith(f"| {pair['gain_points']:+.2f} | {pair['gained']} | {pair['lost']} | "
                             f"{pair['p_value']:.2g} | {pair['p_holm']:.2g} |")  # fmt: skip
    assert [p["p_holm"] for p in pairs] == holm_adjusted([p["p_value"] for p in pairs])
    stands = [p for p in pairs if p["p_holm"] < 0.05]
    gains, losses = sum(p["gained"] > p["lost"] for p in stands), sum(p["gained"] < p["lost"] for p in stands)
    assert (f"Paired with no defense: 3 tests; {gains} gains and {losses} losses stand (Holm-adjusted p < 0.05; "
            "see the report)") in " ".join(result.stderr.split())  # fmt: skip
    assert not [r for r in strict_loads((out / "results.json").read_text()) if "clean_correct" in r]  # rows stay rows

    # --resume: the same pairs from the files; a none cell of 0.22.0 (accuracies only) makes its pairs n/a,
    # naming the file; a cell whose correctness does not give its accuracy is damaged: computed again
    assert invoke([*args, "--resume"]).exit_code == 0
    assert strict_loads((out / "paired.json").read_text())["pairs"] == pairs
    old = next(p for p in (out / "cells").glob("*") if strict_loads(p.read_text())["defense"] == "none"
               and strict_loads(p.read_text())["attack"] == full)  # fmt: skip
    old.write_text(json.dumps({k: v for k, v in strict_loads(old.read_text()).items()
                               if k not in ("clean_correct", "robust_correct")}))  # fmt: skip
    edited = next(p for p in (out / "cells").glob("*") if strict_loads(p.read_text())["attack"] == limited
                  and strict_loads(p.read_text())["defense"] == defense)  # fmt: skip
    cell = strict_loads(edited.read_text())
    flipped = "".join("1" if b == "0" else "0" for b in cell["clean_correct"])
    edited.write_text(json.dumps({**cell, "clean_correct": flipped}))
    again = invoke([*args, "--resume"])
    assert again.exit_code == 0, again.stderr
    assert str(edited) in " ".join(again.stderr.split()) and "damaged" in again.stderr
    assert strict_loads((out / "run.json").read_text())["resumed"]["cells"] == 3
    resumed = strict_loads((out / "paired.json").read_text())["pairs"]
    assert resumed[2] == pairs[2]  # computed again: the same images, the same test
    for pair in resumed[:2]:
        assert pair["gained"] is pair["lost"] is pair["p_value"] is pair["gain_points"] is pair["p_holm"] is None
        assert old.name in pair["not_tested"] and "no per-image correctness" in pair["not_tested"]
        assert pair["none_acc"] == rows[("none", full)][pair["metric"]]
    report = (out / "report.md").read_text()
    assert f"n/a: {resumed[0]['not_tested']}" in report
    assert "Paired with no defense: 1 test, 2 not tested;" in " ".join(again.stderr.split())
    assert f"| sum-victim | {defense} | clean | 24 |" in report and "| n/a | - | - | n/a | n/a |" in report


def test_two_defenses_are_tested_against_each_other_in_paired_json_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each defense was tested against none only: a run comparing two defenses (Fast Preemption and Bi-Level)
    could not say whether their accuracies differ on the same images. With two defenses besides none,
    paired.json holds the pairs of defenses too (``between_defenses``, next to the unchanged ``pairs``) and
    report.md a section "Defenses against each other", their own Holm family; a run of one defense has
    neither."""
    from conftest import tiny_config
    from preempt_cli.evaluate import PAIRED_BETWEEN_TEST, PAIRED_TEST, holm_adjusted, mcnemar_exact
    from preempt_cli.models import ImageModel

    victim = ImageModel(_LevelSum(), tiny_config("sum-victim")).eval().to(TEST_DEVICE)
    monkeypatch.setattr("preempt_cli.cli._eval._model_cache", lambda *args: {"sum-victim": victim}.__getitem__)
    data, first, second, out = tmp_path / "data", tmp_path / "first", tmp_path / "second", tmp_path / "ev"
    first.mkdir(), second.mkdir()
    rng = np.random.default_rng(2)
    labels, expected = {}, {"gained": 0, "lost": 0}
    for i, path in enumerate(write_random_pngs(data, n=24)):
        levels = np.asarray(Image.open(path)).astype(np.int64)
        answers = []
        for folder in (first, second):  # two other tools' defended images
            changed = np.clip(levels + rng.integers(-2, 3, levels.shape), 0, 255)
            Image.fromarray(changed.astype(np.uint8)).save(folder / path.name)
            answers.append(int(changed.sum() % 10))
        # the first defense's answer on every third image, the second's on the others: where the two differ,
        # the first is right only with the first defense (lost), the others only with the second (gained)
        labels[path.name] = answers[0] if i % 3 == 0 else answers[1]
        if answers[0] != answers[1]:
            expected["lost" if i % 3 == 0 else "gained"] += 1
    assert expected["gained"] > expected["lost"] > 2
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    args = ["eval", str(data), "--labels-file", str(tmp_path / "labels.json"), "--victim", "sum-victim",
            "--defense", "none", "--defense", f"folder:{first}", "--defense", f"folder:{second}", "--attack",
            "pgd:steps=1", "--device", TEST_DEVICE_ARG, "--out", str(out)]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.stderr

    paired = strict_loads((out / "paired.json").read_text())
    assert list(paired) == ["test", "pairs", "between_test", "between_defenses"]  # the old keys first, unchanged
    assert paired["test"] == PAIRED_TEST and paired["between_test"] == PAIRED_BETWEEN_TEST
    assert [(p["defense"], p["metric"]) for p in paired["pairs"]] == [
        (f"folder:{d}", m) for d in (first, second) for m in ("clean_acc", "robust_acc")]
    between = paired["between_defenses"]
    full = "PGD-1 Linf 8/255"
    assert [(p["first"], p["second"], p["metric"], p["attack"], p["n"]) for p in between] == [
        (f"folder:{first}", f"folder:{second}", metric, full, 24) for metric in ("clean_acc", "robust_acc")]
    assert (between[0]["gained"], between[0]["lost"]) == (expected["gained"], expected["lost"])
    assert between[0]["gain_points"] == round(100 * (expected["gained"] - expected["lost"]) / 24, 2)
    cells = {c["defense"]: c for c in (strict_loads(p.read_text()) for p in (out / "cells").glob("*"))}
    rows = {r["defense"]: r for r in strict_loads((out / "results.json").read_text())}
    report = (out / "report.md").read_text()
    assert "## Defenses against each other" in report and "the defenses against each other: paired" in report
    for pair in between:
        key = "clean_correct" if pair["metric"] == "clean_acc" else "robust_correct"
        first_ok, second_ok = _bits(cells[pair["first"]][key]), _bits(cells[pair["second"]][key])
        assert (pair["gained"], pair["lost"], pair["p_value"]) == mcnemar_exact(first_ok, second_ok)
        assert (pair["first_acc"], pair["second_acc"]) == (rows[pair["first"]][pair["metric"]],
                                                           rows[pair["second"]][pair["metric"]])  # fmt: skip
        metric = "clean" if pair["metric"] == "clean_acc" else f"robust, {full}"
        assert (f"| sum-victim | folder:{first} | folder:{second} | {metric} | 24 | {pair['first_acc']:.4g} | "
                f"{pair['second_acc']:.4g} | {pair['gain_points']:+.2f} | {pair['gained']} | {pair['lost']} | "
                f"{pair['p_value']:.2g} | {pair['p_holm']:.2g} |") in report.splitlines()  # fmt: skip
    assert [p["p_holm"] for p in between] == holm_adjusted([p["p_value"] for p in between])
    assert [p["p_holm"] for p in paired["pairs"]] == holm_adjusted([p["p_value"] for p in paired["pairs"]])
    stand = sum(p["p_holm"] < 0.05 for p in between)
    stderr = " ".join(result.stderr.split())
    assert (f"Defenses against each other: 2 tests; {stand} difference{'s' if stand != 1 else ''} "
            f"{'stand' if stand != 1 else 'stands'} (Holm-adjusted p < 0.05; see the report)") in stderr
    assert stderr.index("Paired with no defense:") < stderr.index("Defenses against each other:")
    # --resume: the same records, from the correctness the cell files keep
    assert invoke([*args, "--resume"]).exit_code == 0
    assert strict_loads((out / "paired.json").read_text())["between_defenses"] == between

    # one defense besides none: paired.json as before, no section and no line
    single_args = [*args[:10], *args[12:]]
    assert single_args[9] == f"folder:{first}" and single_args[-2:] == ["--out", str(out)]
    single = invoke([*single_args[:-1], str(tmp_path / "single")])
    assert single.exit_code == 0, single.stderr
    assert list(strict_loads((tmp_path / "single" / "paired.json").read_text())) == ["test", "pairs"]
    assert "Defenses against each other" not in (tmp_path / "single" / "report.md").read_text()
    assert "Defenses against each other" not in single.stderr


def test_eval_takes_a_class_name_in_another_case_or_with_spaces_as_protect_does(tmp_path: Path) -> None:
    # a folder `Cat` (or a label file's " dog ") is the class cat for protect --labels folders, and was
    # refused by eval as an unknown class: one data set, two verdicts
    from preempt_cli.errors import LabelError
    from preempt_cli.evaluate import load_dataset

    classes = ["bird", "cat", "dog"]
    write_random_pngs(tmp_path / "data" / "Cat", n=1, seed=0)
    write_random_pngs(tmp_path / "data" / "DOG", n=1, seed=1)
    assert sorted(load_dataset(tmp_path / "data", classes=classes).labels.tolist()) == [1, 2]
    flat = tmp_path / "flat"
    write_random_pngs(flat, n=2, seed=2)
    names = sorted(p.name for p in flat.iterdir())
    (tmp_path / "labels.csv").write_text(f"file,label\n{names[0]}, dog \n{names[1]},Bird\n")
    dataset = load_dataset(flat, classes=classes, labels_file=tmp_path / "labels.csv")
    assert dict(zip((p.name for p in dataset.paths), dataset.labels.tolist())) == {names[0]: 2, names[1]: 0}
    write_random_pngs(tmp_path / "data" / "plane", n=1, seed=3)
    with pytest.raises(LabelError, match="unknown class 'plane'"):
        load_dataset(tmp_path / "data", classes=classes)



def test_eval_names_the_class_a_mistyped_folder_may_mean(tmp_path: Path) -> None:
    # as protect's labels do: a folder `kat` said only "unknown class 'kat'"
    from preempt_cli.errors import LabelError
    from preempt_cli.evaluate import load_dataset

    write_random_pngs(tmp_path / "data" / "kat", n=1, seed=0)
    with pytest.raises(LabelError, match=r"unknown class 'kat'\. Did you mean 'cat'\?$"):
        load_dataset(tmp_path / "data", classes=["bird", "cat", "dog"])

# -- 10. images SSIM cannot score, and what a resumed report takes ----------------------------------------------
def test_images_smaller_than_ssim_s_window_are_refused_before_any_defense_is_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every defended set is scored with SSIM, whose 11x11 window refused 8x8 images only once the defense had
    been computed (the whole of it, then "SSIM needs images of at least 11x11", naming no file)."""
    from preempt_cli.errors import InputConfigError

    computed: list[str] = []
    original = Evaluator._compute_defense

    def compute(self: Evaluator, spec: DefenseSpec, count: int | None = None) -> Any:
        computed.append(spec.name)
        return original(self, spec, count)

    monkeypatch.setattr(Evaluator, "_compute_defense", compute)
    models = {"bb": make_tiny_model(0, name="bb").to(TEST_DEVICE)}
    for height, width, refused in ((8, 8, True), (10, 16, True), (16, 10, True), (11, 11, False)):
        images = torch.zeros(2, 3, height, width, dtype=torch.uint8)
        ds = Dataset(Path("mem"), [Path("mem/a.png"), Path("mem/b.png")], images, torch.tensor([0, 1]))
        evaluator = Evaluator(ds, load=models.__getitem__, device=TEST_DEVICE, batch_size=4)
        computed.clear()
        if not refused:
            assert evaluator.defend(FP).ssim is not None and computed == [FP.name]
            continue
        with pytest.raises(InputConfigError, match=rf"^mem/a\.png and the 1 other images are {height}x{width} pixels: "
                                                   r".*SSIM.* at least 11x11$"):  # fmt: skip
            evaluator.defend(FP)
        assert computed == []
    empty = Dataset(Path("mem"), [], torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(InputConfigError, match=r"^the images of mem are 8x8 pixels: "):  # no file to name
        Evaluator(empty, load=models.__getitem__, device=TEST_DEVICE).check_ssim_size()


def test_eval_of_images_smaller_than_ssim_s_window_fails_at_once_naming_them(tmp_path: Path, registry: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "ev"
    first, _ = write_random_pngs(data / "cat", n=2, size=(8, 8))
    result = invoke(["eval", str(data), "--victim", "tiny-victim", "-b", "tiny-victim", "--defense",
                     "fp:labels=backbone,samples=1,forward=1,backward=0", "--defense", "none", "--attack",
                     "pgd:steps=1", "--device", TEST_DEVICE_ARG, "--out", str(out), "--registry", str(registry),
                     "-q"])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert str(first) in line and "8x8" in line and "11x11" in line and "Traceback" not in result.stderr
    assert not (out / "defenses").exists()  # no defense was computed


def test_a_resumed_report_draws_its_maps_without_scoring_the_defended_images_again(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resume whose cells are all finished takes every row from them; its report's perturbation maps need the
    defended images alone, but each set was scored again (SSIM and LPIPS over every image) to draw them."""
    from preempt_cli import quality

    data, out = tmp_path / "data", tmp_path / "ev"
    write_random_pngs(data / "cat", n=3)
    args = ["eval", str(data), "--victim", "tiny-victim", "-b", "tiny-victim", "--defense", "none", "--defense",
            "fp:labels=backbone,samples=1,forward=1,backward=0", "--attack", "pgd:steps=1", "--device",
            TEST_DEVICE_ARG, "--out", str(out), "--registry", str(registry), "-q"]  # fmt: skip
    assert invoke(args).exit_code == 0
    (figure,) = out.glob("perturbation_*.png")
    drawn, rows = figure.read_bytes(), strict_loads((out / "results.json").read_text())

    def scored(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the resumed defended images were scored again")

    monkeypatch.setattr(quality, "ssim", scored)
    monkeypatch.setattr(quality, "lpips_status", scored)
    resumed = invoke([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert figure.read_bytes() == drawn and strict_loads((out / "results.json").read_text()) == rows


def test_a_defended_set_taken_without_its_quality_is_scored_when_asked(tmp_path: Path) -> None:
    first = _evaluator(tmp_path, resume=False).defend(FP)
    again = _evaluator(tmp_path, resume=True)
    images = again.defend(FP, quality=False)
    assert torch.equal(images.images, first.images) and images.linf == first.linf and images.ssim is None
    scored = again.defend(FP)
    assert scored is images and (scored.ssim, scored.lpips_note) == (first.ssim, first.lpips_note)


def test_a_resumed_report_without_its_defended_sets_computes_only_the_images_its_maps_draw(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every cell finished, ``defenses/`` gone (deleted for its size, or damaged): the report computed the
    whole defense again to draw its map of 8 images; now the batches that hold them, the whole set's first."""
    data, out = tmp_path / "data", tmp_path / "ev"
    write_random_pngs(data / "cat", n=11)
    args = ["eval", str(data), "--victim", "tiny-victim", "-b", "tiny-victim", "--defense",
            "fp:labels=backbone,samples=1,forward=1,backward=0", "--attack", "pgd:steps=1", "--batch-size", "3",
            "--device", TEST_DEVICE_ARG, "--out", str(out), "--registry", str(registry), "-q"]  # fmt: skip
    assert invoke(args).exit_code == 0
    (figure,) = out.glob("perturbation_*.png")
    drawn = figure.read_bytes()
    for cache in (out / "defenses").glob("*.pt"):
        cache.unlink()
    defended: list[int] = []
    original = Evaluator._run_batches

    def run_batches(self: Evaluator, images: torch.Tensor, fn: Any, eps: float) -> Any:
        defended.append(len(images))
        return original(self, images, fn, eps)

    monkeypatch.setattr(Evaluator, "_run_batches", run_batches)
    assert invoke([*args, "--resume"]).exit_code == 0
    assert defended == [9]  # the 3 batches of 3 that hold the first 8 of the 11 images
    assert figure.read_bytes() == drawn
