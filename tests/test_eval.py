"""``preempt eval``: small but real runs with the shared models, and its error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TEST_DEVICE_ARG
from preempt_cli.cli import app
from preempt_cli.errors import ConfigError
from preempt_cli.evaluate import AttackSpec, DefenseSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data" / "cifar10" / "test"
MODELS = SHARED / "models"
needs_shared = pytest.mark.skipif(
    not (CIFAR.is_dir() and MODELS.is_dir()), reason=f"{SHARED} (shared models/data) not found"
)

COMMON = ["--models-dir", str(MODELS), "--device", TEST_DEVICE_ARG, "-b", "cifar10-resnet20-pgdat-a",
          "-c", "cifar10-resnet18-std"]  # fmt: skip


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


@needs_shared
@pytest.mark.shared
def test_eval_grid_protection_raises_pgd_accuracy_and_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    args = ["eval", str(CIFAR), "--limit", "48", "--victim", "cifar10-resnet20-pgdat-b", *COMMON,
            "--defense", "none", "--defense", "fp", "--attack", "pgd:steps=10", "--attack", "aa:limit=4",
            "--out", str(out), "--json", "--csv", str(tmp_path / "rows.csv")]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    cell = {(r["defense"].split("(")[0], r["attack"].split(" ")[0]): r for r in rows}
    none_pgd, fp_pgd = cell[("none", "PGD-10")], cell[("FP", "PGD-10")]
    assert none_pgd["n"] == fp_pgd["n"] == 48
    assert fp_pgd["robust_acc"] > none_pgd["robust_acc"]  # protection buys robustness
    assert fp_pgd["robust_acc"] <= fp_pgd["clean_acc"]
    assert 0 < fp_pgd["linf"] <= 8 / 255 + 1e-9 and fp_pgd["ssim"] < 1 and none_pgd["ssim"] == pytest.approx(1)
    assert fp_pgd["seconds_per_image"] > 0
    # AutoAttack (reference implementation) ran on the first 4 images.
    aa = cell[("FP", "AA-standard")]
    assert aa["n"] == 4 and aa["robust_acc"] <= aa["clean_acc"]
    # Reports: JSON, CSV, markdown with perturbation maps.
    assert len(json.loads((out / "results.json").read_text())) == 4
    assert (tmp_path / "rows.csv").read_text().count("\n") == 5
    report = (out / "report.md").read_text()
    assert "PGD-10" in report and "LPIPS unavailable" in report
    maps = list(out.glob("perturbation_*.png"))
    assert len(maps) == 1 and Image.open(maps[0]).size[0] > 32

    # --resume reuses the finished cells: same rows, no recomputation of the defense.
    (out / "defenses").rename(out / "moved")  # a recomputation would now be needed if cells were not reused
    again = invoke([*args, "--resume"])
    assert again.exit_code == 0
    assert [json.loads(x)["robust_acc"] for x in again.stdout.splitlines()] == [r["robust_acc"] for r in rows]


@needs_shared
@pytest.mark.shared
def test_reversion_protocol_white_box_restores_clean_accuracy(tmp_path: Path) -> None:
    # Measured: with 30% of the labels flipped, protection still *raises* clean accuracy (averaged FGSM
    # is a weak targeted attack), so the protocol's precondition needs every label wrong.
    result = invoke(["eval", str(CIFAR), "--limit", "100", "--reversion", "--flip-fraction", "1",
                     "--victim", "cifar10-resnet20-pgdat-b", *COMMON, "--reversion-backbone", "cifar10-resnet20-pgdat-c",
                     "--out", str(tmp_path), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    res = json.loads(result.stdout)["victims"]["cifar10-resnet20-pgdat-b"]
    acc = res["clean_acc"]
    print(json.dumps(res, indent=1))
    assert acc["protected"] < acc["original"]  # the protocol's precondition: wrong labels hurt
    assert acc["white-box reversion"] > acc["protected"]
    assert res["verdict"]["white-box reversion"].startswith("reverted")
    assert acc["JPEG-50"] <= acc["protected"] and res["verdict"]["JPEG-50"].startswith("distorted")
    assert (tmp_path / "reversion.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--defense", "magic"], "unknown defense"),
        (["--attack", "pgd:stepz=3"], "does not take stepz"),
        (["--attack", "aa:version=fast"], "version"),
        (["--defense", "fp:eta=1", "--defense", "none", "--reversion"], "exactly one fp defense"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_eval_bad_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke(["eval", str(tmp_path), "--victim", "x", "-b", "y", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_specs_parse() -> None:
    spec = DefenseSpec.parse("fp:preset=mspd,samples=4", {"backbone": "k", "classifier": "c"})
    assert spec.kind == "fast-preemption" and spec.get("preset") == "mspd" and spec.get("backbone") == "k"
    assert DefenseSpec.parse("folder:/tmp/x").get("path") == "/tmp/x"
    with pytest.raises(ConfigError, match="needs a backbone"):
        DefenseSpec.parse("bilevel")
    pgd = AttackSpec.parse("pgd:norm=L2,eps=0.5,steps=5,limit=10")
    assert (pgd.norm, pgd.eps, pgd.limit) == ("L2", 0.5, 10)
    assert AttackSpec.parse("aa").name == "AA-standard Linf 8/255"
