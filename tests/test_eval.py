"""``preempt eval``: small but real runs with the shared models, its error handling, and the protocol's rules
(who labels a reversion, verdicts, resume keys, 8-bit AutoAttack, white-box warnings) on tiny models."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from conftest import (FAKE_AUTOATTACK_MODULE, TEST_DEVICE, TEST_DEVICE_ARG, CudaLikeDivision, ThresholdModel,
                      make_per_image_model, make_tiny_model)
from preempt_cli import attacks as attacks_module
from preempt_cli import evaluate as evaluate_module
from preempt_cli.cli import app
from preempt_cli.errors import ConfigError
from preempt_cli.evaluate import (
    AttackSpec,
    Dataset,
    DefenseSpec,
    Evaluator,
    holm_adjusted,
    mcnemar_exact,
    reversion_protocol,
    reversion_verdicts,
)
from preempt_cli.protect import Protector
from preempt_cli.revert import Reverter

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data" / "cifar10" / "test"
MODELS = SHARED / "models"
needs_shared = pytest.mark.skipif(
    not (CIFAR.is_dir() and MODELS.is_dir()), reason=f"{SHARED} (shared models/data) not found"
)

COMMON_NO_CLASSIFIER = ["--models-dir", str(MODELS), "--device", TEST_DEVICE_ARG, "-b", "cifar10-resnet20-pgdat-a"]
COMMON = [*COMMON_NO_CLASSIFIER, "-c", "cifar10-resnet18-std"]


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


@needs_shared
@pytest.mark.shared
@pytest.mark.slow
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
    # PGD still breaks some protected points (measured: clean 95.8%, robust 68.8%): fails for an attack that
    # does nothing, which robust_acc <= clean_acc (true by construction) did not
    assert fp_pgd["robust_acc"] <= fp_pgd["clean_acc"] - 10
    assert 0 < fp_pgd["linf"] <= 8 / 255 + 1e-9 and fp_pgd["ssim"] < 1 and none_pgd["ssim"] == pytest.approx(1)
    assert fp_pgd["seconds_per_image"] > 0
    # AutoAttack (reference implementation) ran on the first 4 images.
    aa = cell[("FP", "AA-standard")]
    # Protection buys robustness against it too: measured all 4 right and all 4 resisting (unprotected, the
    # same AutoAttack leaves 1 of the 4: robust 25%)
    assert aa["n"] == 4 and aa["robust_acc"] >= 75.0
    # Reports: JSON, CSV, markdown with perturbation maps.
    assert len(json.loads((out / "results.json").read_text())) == 4
    assert (tmp_path / "rows.csv").read_text().count("\n") == 5
    report = (out / "report.md").read_text()
    assert "PGD-10" in report and "LPIPS unavailable" in report
    # each defense against none on the same images: the rows' difference, as images gained and lost, tested
    paired = json.loads((out / "paired.json").read_text())
    pairs = {(p["metric"], p["attack"].split(" ")[0]): p for p in paired["pairs"]}
    pgd = pairs[("robust_acc", "PGD-10")]
    assert pgd["gain_points"] == pytest.approx(fp_pgd["robust_acc"] - none_pgd["robust_acc"], abs=0.02)
    assert pgd["gained"] - pgd["lost"] == round(pgd["gain_points"] * 48 / 100) and 0 <= pgd["p_value"] <= 1
    assert set(pairs) == {("clean_acc", "PGD-10"), ("robust_acc", "PGD-10"), ("robust_acc", "AA-standard")}
    assert "## Paired with no defense" in report
    # what the figures were computed with, beside them (a release that rounds otherwise gives other figures)
    from preempt_cli import __version__

    run = json.loads((out / "run.json").read_text())
    assert run["preempt"] == __version__ and run["torch"] == torch.__version__ and run["images"] == 48
    assert set(run["weights_sha256"]) == {"cifar10-resnet20-pgdat-b", "cifar10-resnet20-pgdat-a",
                                          "cifar10-resnet18-std"}  # fmt: skip
    assert all(len(sha) == 64 for sha in run["weights_sha256"].values())
    assert f"Run by preempt {__version__}" in report and run["data_fingerprint"] in report
    assert run["resumed"] == {"defenses": 0, "cells": 0} and [o["preempt"] for o in run["computed_by"]] == [__version__]
    maps = list(out.glob("perturbation_*.png"))
    assert len(maps) == 1 and Image.open(maps[0]).size[0] > 32

    # --resume reuses the finished cells: same rows, no recomputation of the defense.
    (out / "defenses").rename(out / "moved")  # a recomputation would now be needed if cells were not reused
    for cell_file in (out / "cells").glob("*.json"):  # as if another release had computed them
        cell_file.write_text(cell_file.read_text().replace(f'"preempt": "{__version__}"', '"preempt": "0.0.1"'))
    again = invoke([*args, "--resume"])
    assert again.exit_code == 0
    assert [json.loads(x)["robust_acc"] for x in again.stdout.splitlines()] == [r["robust_acc"] for r in rows]
    # ... and the record names who computed them, not the run that resumed them
    resumed = json.loads((out / "run.json").read_text())
    assert resumed["resumed"] == {"defenses": 0, "cells": 4} and resumed["preempt"] == __version__
    assert [o["preempt"] for o in resumed["computed_by"]] == ["0.0.1"]
    assert "4 cells and 0 defended sets were resumed" in (out / "report.md").read_text()
    assert json.loads((out / "paired.json").read_text()) == paired  # from the per-image correctness the cells keep


@needs_shared
@pytest.mark.shared
@pytest.mark.slow
def test_reversion_protocol_on_real_models(tmp_path: Path) -> None:
    # Without -c: flipped labels use no classifier, and the option is refused. Measured: with 30% of the labels flipped, protection still *raises* clean accuracy (averaged FGSM
    # is a weak targeted attack), so the protocol's precondition needs every label wrong.
    def run(*extra: str) -> dict:
        result = invoke(["eval", str(CIFAR), "--limit", "100", "--reversion", "--flip-fraction", "1",
                         "--victim", "cifar10-resnet20-pgdat-c", *COMMON_NO_CLASSIFIER, "--reversion-backbone", "cifar10-resnet20-pgdat-b",
                         "--out", str(tmp_path), "--json", *extra])  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert json.loads((tmp_path / "reversion.json").read_text())["run"]["images"] == 100
        return json.loads(result.stdout)

    # The attacker's own labels (the protocol of the paper and of `preempt revert`): labels of x^r by the
    # backbone of each reverter, since files protected from a label file record no classifier.
    res = run()
    assert res["reverter_labels"] == {"white-box reversion": "backbone cifar10-resnet20-pgdat-a",
                                      "black-box reversion": "backbone cifar10-resnet20-pgdat-b"}  # fmt: skip
    own = res["victims"]["cifar10-resnet20-pgdat-c"]
    print(json.dumps(own, indent=1))
    acc = own["clean_acc"]
    assert acc["protected"] < acc["original"] and own["precondition_met"]  # wrong labels hurt, significantly
    assert own["p_value"]["protected"] < 0.05
    assert acc["JPEG-50"] <= acc["protected"] and own["verdict"]["JPEG-50"].startswith("distorted")
    # The defender's labels handed to the reverters (the old worst case): Eq. 13 then undoes the protection.
    res = run("--reversion-labels", "defender")
    oracle = res["victims"]["cifar10-resnet20-pgdat-c"]
    assert oracle["clean_acc"]["protected"] == acc["protected"]  # the same protected images
    assert oracle["clean_acc"]["white-box reversion"] > acc["protected"]
    assert oracle["verdict"]["white-box reversion"].startswith("reverted")
    assert all("oracle" in note for note in res["reverter_labels"].values())


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
    # named as written (the spec takes bilevel and bi-level alike)
    with pytest.raises(ConfigError, match=r"^defense bilevel needs a backbone \(--backbone or bilevel:backbone=NAME\)$"):
        DefenseSpec.parse("Bilevel")
    with pytest.raises(ConfigError, match="^defense fp does not take foo$"):
        DefenseSpec.parse("fp:foo=1")
    pgd = AttackSpec.parse("pgd:norm=L2,eps=0.5,steps=5,limit=10")
    assert (pgd.norm, pgd.eps, pgd.limit) == ("L2", 0.5, 10)
    assert AttackSpec.parse("aa").name == "AA-standard Linf 8/255"


# -- tiny, in-memory evaluations (no ../shared) ---------------------------------------------------------------



def tiny_dataset(n: int = 6, seed: int = 0, *, labels: torch.Tensor | None = None, hw: int = 16) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, hw, hw), generator=g, dtype=torch.uint8)
    y = labels if labels is not None else torch.randint(0, 10, (n,), generator=g)
    return Dataset(Path("mem"), [Path(f"mem/{i:03d}.png") for i in range(n)], images, y)


def tiny_models(**extra: nn.Module) -> dict[str, nn.Module]:
    models = {"bb": make_tiny_model(0, name="bb"), "clf": make_tiny_model(1, name="clf"),
              "other": make_tiny_model(2, name="other"), "clf2": make_tiny_model(3, name="clf2"),
              "victim": make_tiny_model(4, name="victim"), **extra}  # fmt: skip
    return {k: m.to(TEST_DEVICE) for k, m in models.items()}


def tiny_evaluator(ds: Dataset, models: dict[str, nn.Module], **kwargs) -> Evaluator:
    return Evaluator(ds, load=models.__getitem__, device=TEST_DEVICE, batch_size=4, **kwargs)


FP_FAST = {"backbone": "bb", "classifier": "clf", "samples": "2"}


class _LevelSum(nn.Module):
    """A classifier whose label moves with any change of the pixels: the sum of the 8-bit levels, mod 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = torch.round(x * 255).flatten(1).sum(1).long()
        return nn.functional.one_hot(levels % 10, 10).float()


def level_sum_classifier(hw: int = 16) -> nn.Module:
    from conftest import tiny_config
    from preempt_cli.models import ImageModel

    return ImageModel(_LevelSum(), tiny_config("clf", input_size=(3, hw, hw))).eval()


def fp_spec(**options: str) -> DefenseSpec:
    return DefenseSpec("fast-preemption", tuple(sorted({**FP_FAST, **options}.items())))


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(TEST_DEVICE)).argmax(1).cpu()


class _Spy:
    """Records (instance, images, labels) of every ``transform`` call of a class."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.calls: list[tuple[Protector, torch.Tensor, torch.Tensor]] = []
        original = cls.transform

        def transform(inner, x, y, noise_seeds=None):
            self.calls.append((inner, x.detach().cpu().clone(), y.detach().cpu().clone()))
            return original(inner, x, y, noise_seeds=noise_seeds)

        monkeypatch.setattr(cls, "transform", transform)

    def by_backbone(self, name: str) -> list[tuple[Protector, torch.Tensor, torch.Tensor]]:
        """Per instance whose backbone is ``name``: (instance, images, labels) of all its batches together."""
        instances = list(dict.fromkeys(c[0] for c in self.calls if c[0].backbone.name == name))
        return [(inst, torch.cat([c[1] for c in self.calls if c[0] is inst]),
                 torch.cat([c[2] for c in self.calls if c[0] is inst])) for inst in instances]  # fmt: skip


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_reversion_reverters_label_the_protected_images_themselves(monkeypatch: pytest.MonkeyPatch,
                                                                   flip: float) -> None:  # fmt: skip
    # Algorithm 2: the attacker runs the defense again on x^r, and the defense labels x^r itself. The
    # defender's labels (here: ground truth, every label flipped; or its classifier's labels of the
    # originals) are not the attacker's to have. The classifier's label changes with the pixels.
    models = tiny_models(clf=level_sum_classifier())
    ds = tiny_dataset(6)
    spy = _Spy(monkeypatch, Reverter)
    res = reversion_protocol(tiny_evaluator(ds, models), victims=["victim"], defense=fp_spec(),
                             black_box_backbone=["other"], flip_fraction=flip)  # fmt: skip
    # White-box: as `preempt revert --white-box` on such files: the classifier the defense labelled with,
    # else (flipped ground truth: a label file, no classifier recorded) the backbone.
    white_labeller = models["clf"] if flip == 0 else models["bb"]
    (white,) = spy.by_backbone("bb")
    assert torch.equal(white[2], predict(white_labeller, white[1]))
    # Black-box: the white-box attacker with its own backbone.
    (black,) = spy.by_backbone("other")
    assert torch.equal(black[2], predict(models["clf"] if flip == 0 else models["other"], black[1]))
    assert torch.equal(white[1], black[1])  # both revert the same protected images
    expected = {"white-box reversion": "classifier clf" if flip == 0 else "backbone bb",
                "black-box reversion": "classifier clf" if flip == 0 else "backbone other"}  # fmt: skip
    assert res["reverter_labels"] == expected
    if flip:
        assert not torch.equal(white[2], ds.labels)  # nor the true labels
        assert "labels=ground-truth" in res["defense"]  # the labels the defense used
    else:  # not the classifier's labels of the originals
        assert not torch.equal(white[2], predict(models["clf"], ds.images.float() / 255))


def test_flipped_labels_neither_load_nor_warn_of_the_defense_s_classifier(caplog: pytest.LogCaptureFixture) -> None:
    """With --flip-fraction the defense labels with flipped ground truth: its classifier was loaded, and
    warned of as the defense's when it was also the victim, though nothing used it."""
    models = tiny_models()
    loaded: list[str] = []
    ev = Evaluator(tiny_dataset(4), load=lambda name: loaded.append(name) or models[name], device=TEST_DEVICE,
                   batch_size=4)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        reversion_protocol(ev, victims=["clf"], defense=fp_spec(), black_box_backbone="other", flip_fraction=1.0)
    assert "clf" in loaded  # as the victim
    assert not [r for r in caplog.records if "is the classifier of defense" in r.getMessage()]
    loaded.clear()
    reversion_protocol(ev, victims=["victim"], defense=fp_spec(), black_box_backbone="other", flip_fraction=1.0)
    assert "clf" not in loaded


def test_flipped_labels_refuse_a_defense_that_declares_other_labels() -> None:
    """``fp:labels=backbone`` with ``flip_fraction`` was protected with flipped ground truth instead, without a
    word (only the results' defense name said so): labels the defense declares are refused, not replaced."""
    ev = tiny_evaluator(tiny_dataset(4), tiny_models())
    for labels in ("backbone", "classifier"):
        with pytest.raises(ConfigError, match=f"flipped ground truth, not labels={labels}"):
            reversion_protocol(ev, victims=["victim"], defense=fp_spec(labels=labels), black_box_backbone=None,
                               flip_fraction=0.5)  # fmt: skip
    res = reversion_protocol(ev, victims=["victim"], defense=fp_spec(labels="ground-truth"), black_box_backbone=None,
                             flip_fraction=0.5)  # fmt: skip
    assert res["labels"] == "ground truth with 50% of labels flipped (2 of 4 images)"


@pytest.mark.parametrize("seed", range(5))
def test_flip_fraction_flips_that_fraction_of_the_labels(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """--flip-fraction 0.3 flipped each label with probability 0.3: a binomial number of them (2 to 8 of 20
    for these seeds), while the results said "30% of labels flipped". It flips the nearest whole number of
    images to the fraction, and says how many."""
    ds = tiny_dataset(20)
    spy = _Spy(monkeypatch, Protector)
    res = reversion_protocol(tiny_evaluator(ds, tiny_models()), victims=["victim"], defense=fp_spec(),
                             black_box_backbone=None, flip_fraction=0.3, seed=seed)  # fmt: skip
    (defended,) = spy.by_backbone("bb")
    assert int((defended[2] != ds.labels).sum()) == 6
    assert res["labels"] == "ground truth with 30% of labels flipped (6 of 20 images)"
    one = reversion_protocol(tiny_evaluator(tiny_dataset(1), tiny_models()), victims=["victim"], defense=fp_spec(),
                             black_box_backbone=None, flip_fraction=0.3, seed=seed)  # fmt: skip
    assert one["labels"] == "ground truth with 30% of labels flipped (0 of 1 image)"


def test_a_black_box_reverter_holding_the_key_is_refused() -> None:
    """``--reversion-backbone`` naming the defense's own backbone (or its weights under another name) made a
    "black-box reversion" stage that held the key: a white-box reversion reported as black-box."""
    models = tiny_models()
    models["bb-copy"] = make_tiny_model(0, name="bb-copy").to(TEST_DEVICE)  # the key's weights, renamed
    ev = tiny_evaluator(tiny_dataset(4), models)
    for other in ("bb", ["other", "bb-copy"]):
        with pytest.raises(ConfigError, match="is the defense's backbone"):
            reversion_protocol(ev, victims=["victim"], defense=fp_spec(), black_box_backbone=other, flip_fraction=1.0)
    res = reversion_protocol(ev, victims=["victim"], defense=fp_spec(), black_box_backbone="other", flip_fraction=1.0)
    assert "black-box reversion" in res["victims"]["victim"]["clean_acc"]


def test_reversion_black_box_classifier_and_the_oracle_option(monkeypatch: pytest.MonkeyPatch) -> None:
    models = tiny_models()
    ds = tiny_dataset(6)
    spy = _Spy(monkeypatch, Reverter)
    protector_spy = _Spy(monkeypatch, Protector)
    ev = tiny_evaluator(ds, models)
    reversion_protocol(ev, victims=["victim"], defense=fp_spec(), black_box_backbone="other", flip_fraction=1.0,
                       black_box_classifier="clf2")  # fmt: skip
    (black,) = spy.by_backbone("other")
    assert torch.equal(black[2], predict(models["clf2"], black[1]))

    spy.calls.clear()
    protector_spy.calls.clear()
    res = reversion_protocol(ev, victims=["victim"], defense=fp_spec(), black_box_backbone="other", flip_fraction=1.0,
                             reverter_labels="defender")  # fmt: skip
    (defended,) = protector_spy.by_backbone("bb")
    reverters = spy.by_backbone("bb") + spy.by_backbone("other")
    assert len(reverters) == 2 and all(torch.equal(r[2], defended[2]) for r in reverters)
    assert all("oracle" in note for note in res["reverter_labels"].values())
    with pytest.raises(ConfigError, match="reverter labels"):
        reversion_protocol(ev, victims=["victim"], defense=fp_spec(), black_box_backbone=None,
                           reverter_labels="truth")  # fmt: skip


@pytest.mark.parametrize(("labels", "note"), [("ground-truth", "ground truth"), ("classifier", "labels of classifier clf"),
                                              ("backbone", "labels of backbone bb")])  # fmt: skip
def test_reversion_defender_labels_follow_the_declared_source(monkeypatch: pytest.MonkeyPatch, labels: str,
                                                              note: str) -> None:  # fmt: skip
    models = tiny_models()
    ds0 = tiny_dataset(6)
    # ground truth that neither model predicts, so each source gives different labels
    truth = (torch.maximum(predict(models["bb"], ds0.images.float() / 255),
                           predict(models["clf"], ds0.images.float() / 255)) + 1) % 10  # fmt: skip
    truth[(truth == predict(models["bb"], ds0.images.float() / 255))] += 1
    ds = tiny_dataset(6, labels=truth % 10)
    spy = _Spy(monkeypatch, Protector)
    res = reversion_protocol(tiny_evaluator(ds, models), victims=["victim"], defense=fp_spec(labels=labels),
                             black_box_backbone=None)  # fmt: skip
    (call,) = spy.by_backbone("bb")
    x = ds.images.float() / 255
    expected = {"ground-truth": ds.labels, "classifier": predict(models["clf"], x), "backbone": predict(models["bb"], x)}
    assert torch.equal(call[2], expected[labels])
    assert res["labels"] == note
    # The white-box attacker has no ground truth: it labels with the backbone (as `preempt revert`).
    assert res["reverter_labels"]["white-box reversion"] == ("classifier clf" if labels == "classifier" else "backbone bb")


def test_holm_adjusted_is_holms_step_down() -> None:
    """Holm's adjustment by its definition: sorted p's times m, m - 1, ..., made monotone, capped at 1, given
    back in the input's order (the worked example of Holm's method with m = 4)."""
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([0.5, 0.9]) == [1.0, 1.0] and holm_adjusted([0.2]) == [0.2] and holm_adjusted([]) == []
    ps = [0.001, 0.2, 0.01, 0.01, 0.6]
    adjusted = holm_adjusted(ps)
    assert all(p <= a <= min(1.0, 5 * p) for p, a in zip(ps, adjusted))  # between raw and Bonferroni
    assert adjusted[2] == adjusted[3] == pytest.approx(0.04)  # ties: the larger of the two steps, for both


def test_mcnemar_exact_and_reversion_verdicts() -> None:
    t, f = True, False
    assert mcnemar_exact(torch.tensor([f] * 10), torch.tensor([t] * 10)) == (10, 0, pytest.approx(2 / 1024))
    assert mcnemar_exact(torch.tensor([t, f]), torch.tensor([t, f])) == (0, 0, 1.0)
    gained, lost, p = mcnemar_exact(torch.tensor([t, f, f, t]), torch.tensor([f, t, t, t]))
    assert (gained, lost) == (2, 1) and p == pytest.approx(1.0)  # 2 * P(X <= 1 | n=3) = 2 * 4/8

    n = 40
    orig = torch.ones(n, dtype=torch.bool)
    prot = torch.zeros(n, dtype=torch.bool)  # a significant drop: the precondition holds
    one_back = prot.clone()
    one_back[0] = True  # one image of 40 back: higher, but within noise
    many_back = prot.clone()
    many_back[:30] = True
    worse = prot.clone()
    verdicts, p_values, discordant, met = reversion_verdicts(
        {"original": orig, "protected": prot, "one": one_back, "many": many_back, "worse": worse})
    assert met and p_values["protected"] < 1e-9
    assert verdicts["one"].startswith("within noise") and p_values["one"] == 1.0 and discordant["one"] == [1, 0]
    assert verdicts["many"].startswith("reverted (75% of the drop recovered, p=")
    assert verdicts["worse"].startswith("distorted")
    # A drop of one image in 40 is no precondition.
    prot_small = orig.clone()
    prot_small[0] = False
    verdicts, p_values, _, met = reversion_verdicts({"original": orig, "protected": prot_small, "one": orig})
    assert not met and "within noise" in verdicts["one"] and verdicts["one"].startswith("protocol not met")


def test_reversion_verdicts_give_points_and_shares_of_the_drop_from_counts_rounded_half_to_even() -> None:
    """The verdicts' "+x points" and "y% of the drop recovered" came from float32 means: 1 image of 160 back
    read +0.63 points, and 28 of a drop of 160 (17.5%) 17%, as no row or paired test rounds them. They are
    now percent() of the counts: 0.62 and 18%, 20 of 160 (12.5%) 12%, ties to the even last digit."""
    n = 160
    stages = {"original": torch.ones(n, dtype=torch.bool), "protected": torch.zeros(n, dtype=torch.bool)}
    stages |= {str(back): torch.arange(n) < back for back in (1, 20, 28)}
    verdicts, _, discordant, met = reversion_verdicts(stages)
    assert met and discordant["1"] == [1, 0] and discordant["28"] == [28, 0]
    assert verdicts["1"].startswith(f"within noise (+{float(round(Fraction(100, n), 2)):.2f} points, p=")
    assert verdicts["1"].startswith("within noise (+0.62 points, p=")
    assert verdicts["20"].startswith("reverted (12% of the drop recovered, p=")
    assert verdicts["28"].startswith("reverted (18% of the drop recovered, p=")


def _exact_mcnemar(gained: int, lost: int) -> Fraction:
    """The exact two-sided McNemar p-value as a fraction: 2 P(X <= min) for X ~ Binomial(gained + lost, 1/2)."""
    n = gained + lost
    if n == 0:
        return Fraction(1)
    return min(Fraction(1), Fraction(2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)), 2**n))


def _discordant(gained: int, lost: int, agreeing: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness before and after on gained + lost + agreeing images: ``gained`` right only after, ``lost``
    right only before, ``agreeing`` right with both."""
    before = torch.tensor([False] * gained + [True] * lost + [True] * agreeing)
    after = torch.tensor([True] * gained + [False] * lost + [True] * agreeing)
    return before, after


@pytest.mark.parametrize("gained,lost", [(0, 0), (1, 0), (0, 1), (3, 3), (7, 2), (2, 30), (400, 532), (932, 0),
                                         (1023, 1), (1100, 0), (2000, 5), (3000, 2900)])
def test_mcnemar_exact_is_the_binomial_tail_and_never_0(gained: int, lost: int) -> None:
    """The p-value is 2 P(X <= min(gained, lost)) under Binomial(gained + lost, 1/2), checked in exact
    fractions. Beyond about 1,000 discordant images all one way it is below the floats' range: it was 0.0
    (printed "0" in report.md, as a certainty), and is now a positive bound no smaller than the exact value."""
    got_gained, got_lost, p = mcnemar_exact(*_discordant(gained, lost, agreeing=5))
    exact = _exact_mcnemar(gained, lost)
    assert (got_gained, got_lost) == (gained, lost)
    assert 0 < p <= 1 and Fraction(p) >= exact * (1 - Fraction(1, 10**15))
    if exact >= Fraction(1, 10**300):  # in the floats' range: the exact value, rounded once
        assert abs(Fraction(p) - exact) <= exact * Fraction(1, 10**15)


def test_mcnemar_exact_holds_on_many_discordant_images() -> None:
    """The tail's terms are built one from the last (one math.comb per term took 11 s for 5,000 discordant
    images each way; how fast it is now is benchmark matter, not a test's): the same exact value as the
    binomial sum, term by term, on thousands of discordant images."""
    from fractions import Fraction

    gained, lost, p = mcnemar_exact(*_discordant(1_500, 1_300))
    n = gained + lost
    exact = min(Fraction(1), 2 * Fraction(sum(math.comb(n, k) for k in range(min(gained, lost) + 1)), 2**n))
    assert (gained, lost) == (1_500, 1_300) and p == pytest.approx(float(exact), rel=1e-12) and 0 < p < 0.01


def test_p_values_past_the_floats_range_are_not_printed_as_0() -> None:
    """report.md and the reversion verdicts printed a p-value with .2g: one that underflowed read "0" (p=0), a
    certainty no test gives. Every p printed is now the value's, or "<1e-300" for one below it."""
    from preempt_cli.cli._eval import _test_cells

    _, _, p = mcnemar_exact(*_discordant(1200, 0))
    record = {"not_tested": None, "gain_points": 100.0, "gained": 1200, "lost": 0, "p_value": p,
              "p_holm": holm_adjusted([p, 0.5])[0]}  # fmt: skip
    assert _test_cells(record, [])[3:] == ["<1e-300", "<1e-300"]
    record.update(p_value=1.1e-280, p_holm=3.3e-280)  # 932 images all one way: a value, printed as it is
    assert _test_cells(record, [])[3:] == ["1.1e-280", "3.3e-280"]
    n = 1200
    orig, prot = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    verdicts, p_values, _, met = reversion_verdicts({"original": orig, "protected": prot, "back": orig})
    assert met and 0 < p_values["protected"] and 0 < p_values["back"]
    assert verdicts["back"] == "reverted (100% of the drop recovered, p=<1e-300)"


def test_reversion_results_carry_p_values() -> None:
    models = tiny_models()
    res = reversion_protocol(tiny_evaluator(tiny_dataset(6), models), victims=["victim"], defense=fp_spec(),
                             black_box_backbone="other", flip_fraction=1.0)  # fmt: skip
    victim = res["victims"]["victim"]
    assert set(victim["p_value"]) == {"protected", "white-box reversion", "black-box reversion", "JPEG-50"}
    assert all(0 <= p <= 1 for p in victim["p_value"].values())
    assert "McNemar" in res["test"] and isinstance(victim["precondition_met"], bool)
    for stage, verdict in victim["verdict"].items():
        assert verdict.startswith("protocol not met") or "p=" in verdict


# -- resume keys ------------------------------------------------------------------------------------------


def test_resume_does_not_reuse_cells_or_defenses_of_other_data_or_weights(tmp_path: Path) -> None:
    models = tiny_models()
    ds = tiny_dataset(6, seed=0)
    x = ds.images.float() / 255
    right = Dataset(ds.root, ds.paths, ds.images, predict(models["victim"], x))  # the victim is always right
    wrong = Dataset(ds.root, ds.paths, ds.images, (right.labels + 1) % 10)  # same size, other labels
    other_pixels = tiny_dataset(6, seed=1)
    other_pixels = Dataset(ds.root, ds.paths, other_pixels.images, predict(models["victim"], other_pixels.images.float() / 255))
    none = DefenseSpec("none")

    def clean(dataset: Dataset, model_set: dict[str, nn.Module], spec: DefenseSpec = none) -> float:
        return tiny_evaluator(dataset, model_set, out_dir=tmp_path, resume=True).cell("victim", spec, None)["clean_acc"]

    assert clean(right, models) == 100.0
    assert clean(wrong, models) == 0.0  # same size, other labels: not the cached cell
    assert clean(other_pixels, models) == 100.0
    # Retrained weights under the same name: recomputed (by the recorded sha256, or the state itself).
    retrained = {**models, "victim": make_tiny_model(5, name="victim").to(TEST_DEVICE)}
    assert clean(right, retrained) == pytest.approx(100 * (predict(retrained["victim"], x) == right.labels).float().mean().item(), abs=0.01)
    assert clean(right, retrained) != 100.0
    # The same weights under the same name and data: the cell is reused (resume still works).
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert clean(right, models) == 100.0 and sorted((tmp_path / "cells").glob("*.json")) == cells
    # A recorded weights sha256 is what identifies loaded weights.
    models["victim"].weights_sha256 = "a" * 64
    clean(right, models)
    assert len(list((tmp_path / "cells").glob("*.json"))) == len(cells) + 1

    # Defended sets: another backbone under the same name is not the cached one.
    spec, out = fp_spec(), tmp_path / "fp"
    first = tiny_evaluator(right, models, out_dir=out, resume=True).defend(spec)
    again = tiny_evaluator(right, models, out_dir=out, resume=True).defend(spec)
    assert torch.equal(first.images, again.images) and len(list((out / "defenses").glob("*.pt"))) == 1
    rekeyed = {**models, "bb": make_tiny_model(6, name="bb").to(TEST_DEVICE)}
    other = tiny_evaluator(right, rekeyed, out_dir=out, resume=True).defend(spec)
    assert not torch.equal(first.images, other.images)
    assert len(list((out / "defenses").glob("*.pt"))) == 2


# -- white-box victims ----------------------------------------------------------------------------------------


def test_a_victim_that_is_a_defense_model_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    models = tiny_models(twin=make_tiny_model(1, name="twin"))  # the classifier's weights under another name
    ev = tiny_evaluator(tiny_dataset(4), models)
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        ev.cell("victim", fp_spec(), None)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        ev.cell("bb", fp_spec(), None)
        ev.cell("bb", fp_spec(), None)
        ev.cell("twin", fp_spec(), None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "victim bb is the backbone" in warnings[0] and "white-box" in warnings[0]
    assert "victim twin is the classifier" in warnings[1]


# -- AutoAttack rounded to 8 bits -----------------------------------------------------------------------------


def test_autoattack_rounding_does_not_restore_points_no_later_attack_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attacks_module, "_import_autoattack", lambda: FAKE_AUTOATTACK_MODULE)
    images = torch.full((4, 3, 16, 16), 100, dtype=torch.uint8)
    ds = Dataset(Path("mem"), [Path(f"{i}.png") for i in range(4)], images, torch.zeros(4, dtype=torch.long))
    ev = tiny_evaluator(ds, {"victim": ThresholdModel(100.3 / 255)})
    row = ev.cell("victim", DefenseSpec("none"), AttackSpec.parse("aa"))
    # The float "nudge" fools every point; rounded to 8 bits it is the clean image again. Rounding the
    # cascade's result once reported 100% robust; the 8-bit cascade attacks them with "push" next.
    assert row["clean_acc"] == 100.0
    assert row["robust_acc"] == 0.0
    assert row["robust_acc_float"] == 0.0 and row["robust_acc_rounded_once"] == 100.0


def test_defenses_default_to_the_papers_budget_for_their_backbones_dataset() -> None:
    from dataclasses import replace

    from preempt_cli.engine import FastPreemption

    models = tiny_models()
    models["bb"].config = replace(models["bb"].config, dataset="imagenet-1k")
    ev = tiny_evaluator(tiny_dataset(), models)
    assert ev._protector(DefenseSpec.parse("fp", FP_FAST)).config.eps == 4 / 255  # as `preempt protect` does
    assert ev._protector(DefenseSpec.parse("fp:eps=8/255", FP_FAST)).config.eps == 8 / 255
    assert FastPreemption(models["bb"]).config.eps == 4 / 255
    assert FastPreemption(models["clf"]).config.eps == 8 / 255


# -- attack cells attack the defended images ------------------------------------------------------------------


def test_attack_cells_attack_the_defended_images(monkeypatch: pytest.MonkeyPatch) -> None:
    import preempt_cli.evaluate as evaluate_module

    models = tiny_models()
    ds0 = tiny_dataset(6)
    defended = tiny_evaluator(ds0, models).defend(fp_spec()).images
    assert not torch.equal(defended, ds0.images)  # the defense moved the pixels: the test can tell them apart
    # labels the victim gives the defended images (the defense labels with its classifier, not with these):
    # every point is right clean, so every one is attacked
    labels = predict(models["victim"], defended.float() / 255)
    ds = Dataset(ds0.root, ds0.paths, ds0.images, labels)

    given: list[torch.Tensor] = []  # what robust_correctness is given
    attacked: list[torch.Tensor] = []  # what the attack is given
    real_robust_correctness = evaluate_module.robust_correctness

    def recording_robust_correctness(model, attack, x, y, batch_size=250):
        given.append(x.detach().cpu().clone())
        original_perturb = attack.perturb

        def perturb(xb, yb):
            attacked.append(xb.detach().cpu().clone())
            return original_perturb(xb, yb)

        attack.perturb = perturb
        return real_robust_correctness(model, attack, x, y, batch_size=batch_size)

    monkeypatch.setattr(evaluate_module, "robust_correctness", recording_robust_correctness)
    ev = tiny_evaluator(ds, models)
    assert torch.equal(ev.defend(fp_spec()).images, defended)
    row = ev.cell("victim", fp_spec(), AttackSpec.parse("pgd:steps=2,limit=5"))
    assert len(given) == 1
    # the CPU's floats on every device (a GPU's x / 255, a product with the reciprocal, was a bit off them)
    assert torch.equal(given[0], defended[:5].float() / 255)  # the defended images, not the originals
    assert torch.equal(torch.cat(attacked), defended[:5].float() / 255)
    assert row["n"] == 5 and row["clean_acc"] == 100.0


def test_rows_of_a_classifier_ablation_or_of_two_folders_of_one_name_are_told_apart() -> None:
    """The classifier was left out of a defense's name, and a folder defense was named by its last part:
    the rows of such a grid could not be attributed."""
    a, b = (DefenseSpec.parse(f"fp:backbone=bb,classifier={c}") for c in ("clf", "clf2"))
    assert a.name != b.name and "classifier=clf2" in b.name
    assert DefenseSpec.parse("folder:a/protected").name != DefenseSpec.parse("folder:b/protected").name


def test_autoattack_attacks_8_bit_images_in_both_norms() -> None:
    """AutoAttack L2 rows were float images, beside PGD-L2's rounded ones, in a report calling all 8-bit."""
    model = make_tiny_model(4, name="victim")
    for norm in ("Linf", "L2"):
        attack = AttackSpec.parse(f"aa:norm={norm}").build(model, batch_size=4)
        assert attack.quantize, norm


def test_clean_accuracy_is_measured_in_eval_mode_whatever_the_callers_model(tmp_path: Path) -> None:
    """A clean cell called the victim as it came; robust_accuracy puts it in eval mode. A model loaded by a
    caller's ``load`` in train mode gave BatchNorm batch statistics there."""

    class BatchNormVictim(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.head = nn.BatchNorm2d(3), nn.Linear(3, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    victim = BatchNormVictim().to(TEST_DEVICE)
    victim.norm.running_mean.fill_(5.0)  # far from the batch: eval and train mode answer otherwise
    ds = tiny_dataset(8)
    expected = victim.eval()(ds.images.float().div(255).to(TEST_DEVICE)).argmax(1).cpu()
    victim.train()
    row = tiny_evaluator(ds, {"victim": victim}).cell("victim", DefenseSpec("none"), None)
    assert row["clean_acc"] == round(100 * (expected == ds.labels).float().mean().item(), 2)
    assert victim.training  # given back as it came


def _key_of_0_23(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _bilevel_key_of_0_23(ev: Evaluator, spec: DefenseSpec) -> str:
    """The key 0.23.0 and earlier gave a Bi-Level set: it held the batch size (PGD drew its random starts by
    an image's place in the batch)."""
    models = [[name, *ev._model_identity(name)] for _, name in ev.defense_models(spec)]
    return _key_of_0_23([evaluate_module._RESUME_FORMAT, spec.kind, spec.options, ev.data_fingerprint, models,
                         ev.batch_size])  # fmt: skip


def _cell_key_of_0_23(ev: Evaluator, victim: str, spec: DefenseSpec, attack: AttackSpec) -> str:
    """The key 0.23.0 and earlier gave an attack's cell (its file's name): it held the attack batch size."""
    return _key_of_0_23([evaluate_module._RESUME_FORMAT, evaluate_module._CELL_FORMAT, victim,
                         *ev._model_identity(victim), ev.defense_key(spec),
                         [attack.kind, attack.options, ev.attack_batch_size]])  # fmt: skip


def test_a_bilevel_set_is_kept_whatever_the_batch_size_but_not_one_of_the_old_starts(tmp_path: Path) -> None:
    """Bi-Level's inner PGD drew its random starts by an image's place in the batch, so a Bi-Level set was
    kept per batch size. The starts are per image now, and so are its images (test_baselines): the key holds
    how PGD draws its starts instead, so that a --resume with another --batch-size reuses the set, and never
    one made with the old starts. Fast Preemption's images never depended on their batch."""
    ds, models = tiny_dataset(4), tiny_models()
    bilevel = DefenseSpec.parse("bilevel:backbone=bb,labels=backbone,steps=1,inner_steps=1")
    evs = {size: Evaluator(ds, load=models.__getitem__, device=TEST_DEVICE, batch_size=size, out_dir=tmp_path,
                           resume=True) for size in (2, 4)}  # fmt: skip
    assert evs[2].defense_key(bilevel) == evs[4].defense_key(bilevel)
    assert evs[2].defense_key(fp_spec()) == evs[4].defense_key(fp_spec())
    settings = evs[4].defense_settings(bilevel)
    assert settings["starts"] == "per-image" and "batch_size" not in settings
    made = evs[4].defend(bilevel)
    cache = tmp_path / "defenses" / f"{evs[4].defense_key(bilevel)}.pt"
    assert cache.is_file()
    # a set the old starts made, under the name 0.23.0 gave it, is not taken for one of the new starts
    cache.rename(cache.with_name(f"{_bilevel_key_of_0_23(evs[4], bilevel)}.pt"))
    again = Evaluator(ds, load=models.__getitem__, device=TEST_DEVICE, batch_size=4, out_dir=tmp_path, resume=True)
    assert torch.equal(again.defend(bilevel).images, made.images)
    assert again.provenance()["resumed"]["defenses"] == 0


def test_models_of_other_classes_than_the_datas_labels_are_refused() -> None:
    """The data's labels were read in the first victim's class order and scored every victim by it: a
    victim listing its classes in another order scored 5% where it scored 90%, and a 20-class victim was
    scored against 10-class labels, without a word."""
    import dataclasses

    names = tuple(f"c{i}" for i in range(10))
    named = {}
    for key, classes in (("victim", names), ("reversed", names[::-1])):
        model = make_tiny_model(4, name=key)
        model.config = dataclasses.replace(model.config, classes=classes)
        named[key] = model
    twenty = make_tiny_model(5, name="twenty", num_classes=20)
    ds = dataclasses.replace(tiny_dataset(), classes=names)
    evaluator = tiny_evaluator(ds, {**tiny_models(), **named, "twenty": twenty})
    assert evaluator.load_victim("victim") is named["victim"]
    with pytest.raises(ConfigError, match=r"reversed names its classes in another order .*\[c9, c8, c7, \.\.\. \(10\)\]"):
        evaluator.load_victim("reversed")
    with pytest.raises(ConfigError, match="twenty has 20 classes, the data's labels 10"):
        evaluator.load_victim("twenty")
    # labels as indices (a label file of numbers): the first model's count decides
    by_index = tiny_evaluator(tiny_dataset(), {**tiny_models(), "twenty": twenty})
    by_index.load_victim("victim")
    with pytest.raises(ConfigError, match="twenty has 20 classes, the data's labels 10"):
        by_index.load_victim("twenty")
    with pytest.raises(ConfigError, match="label 12 of the data is no class of victim"):
        tiny_evaluator(tiny_dataset(labels=torch.tensor([0, 1, 2, 3, 4, 12])), tiny_models()).load_victim("victim")
    assert ds.subset(2).classes == names
    # a defense labelling with its own models protects data of other classes too (0.17.0 refused it at
    # first: any eval of non-CIFAR-10 data with the default defenses); with the ground truth it may not
    assert evaluator.load("reversed") is named["reversed"]
    other_clf = make_tiny_model(1, name="clf")
    other_clf.config = dataclasses.replace(other_clf.config, classes=names[::-1])
    mixed = tiny_evaluator(ds, {**tiny_models(), **named, "bb": named["reversed"], "clf": other_clf})
    assert mixed.defend(fp_spec()).images.shape == ds.images.shape
    with pytest.raises(ConfigError, match="reversed names its classes in another order"):
        mixed.defend(fp_spec(labels="ground-truth"))


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as Linux has them")
def test_a_defense_cache_that_does_not_fit_on_disk_is_a_write_error_naming_it(tmp_path: Path) -> None:
    """torch.save into the cache on a full disk raised torch's RuntimeError ("[enforce fail at
    inline_container.cc] unexpected pos"), an internal error naming no file."""
    import subprocess

    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_eval import tiny_dataset, tiny_evaluator, tiny_models, fp_spec
from preempt_cli.errors import ImageWriteError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # a short write inside torch's zip writer
try:
    tiny_evaluator(tiny_dataset(), tiny_models(), out_dir=__import__("pathlib").Path({str(tmp_path)!r})).defend(fp_spec())
except ImageWriteError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "defenses" in done.stdout and "cannot write: File too large" in done.stdout, done.stdout
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_attack_without_eps_takes_the_victims_budget() -> None:
    """The attack's eps defaulted to 8/255 for every dataset: an ImageNet victim's protection (4/255) was
    attacked with twice its budget unless eps was given by hand (METHOD.md: the same budget)."""
    import dataclasses

    imagenet = make_tiny_model(4, name="victim")
    imagenet.config = dataclasses.replace(imagenet.config, dataset="imagenet-1k")
    ds = tiny_dataset()
    rows = {}
    for name, models in (("cifar", tiny_models()), ("imagenet", {**tiny_models(), "victim": imagenet})):
        evaluator = tiny_evaluator(ds, models)
        rows[name] = evaluator.cell("victim", DefenseSpec.parse("none"), AttackSpec.parse("pgd:steps=2"))
    assert rows["cifar"]["attack"] == "PGD-2 Linf 8/255" and rows["imagenet"]["attack"] == "PGD-2 Linf 4/255"
    given = tiny_evaluator(ds, {**tiny_models(), "victim": imagenet}).cell(
        "victim", DefenseSpec.parse("none"), AttackSpec.parse("pgd:steps=2,eps=8/255"))
    assert given["attack"] == "PGD-2 Linf 8/255"  # given: kept


@pytest.mark.parametrize("text", ["pgd:steps=0", "pgd:restarts=0", "pgd:norm=L3", "pgd:norm=L2,eps=-1", "pgd:seed=-1",
                                  "pgd:steps=abc", "pgd:step_size=x", "aa:norm=L3", "aa:seed=-2"])  # fmt: skip
def test_attack_values_are_refused_when_parsed(text: str) -> None:
    # they parsed (names like "PGD--1 Linf 8/255"), and failed in the cell, after the defense was computed;
    # steps=abc was a plain ValueError
    with pytest.raises(ConfigError):
        AttackSpec.parse(text)


def test_rows_of_attacks_of_other_restarts_step_sizes_or_seeds_are_told_apart(tmp_path: Path) -> None:
    """An attack's name left out its step size, restarts and seed: ``--attack pgd --attack pgd:restarts=5
    --attack pgd:seed=1`` gave three rows named "PGD-20 Linf 8/255". The defaults keep their names, and a
    resumed cell is named as the run resuming it names it (the key decides what it holds)."""
    texts = ["pgd", "pgd:restarts=5", "pgd:step_size=1/255", "pgd:seed=1", "pgd:limit=3",
             "pgd:restarts=5,seed=1,limit=3", "pgd:norm=L2", "pgd:norm=L2,step_size=0.1", "aa", "aa:seed=1"]  # fmt: skip
    names = [AttackSpec.parse(t).name for t in texts]
    assert len(set(names)) == len(names), names
    assert AttackSpec.parse("pgd:step_size=2/255,restarts=1,seed=0").name == AttackSpec.parse("pgd").name
    assert AttackSpec.parse("pgd").name == "PGD-20 Linf 8/255"
    assert AttackSpec.parse("aa:limit=50").name == "AA-standard Linf 8/255 (first 50)"

    ds, models, attack = tiny_dataset(4), tiny_models(), AttackSpec.parse("pgd:steps=1,restarts=2")
    row = tiny_evaluator(ds, models, out_dir=tmp_path).cell("victim", DefenseSpec("none"), attack)
    assert row["attack"] == attack.name
    (cell,) = (tmp_path / "cells").glob("*.json")
    cell.write_text(cell.read_text().replace(attack.name, "PGD-1 Linf 8/255"))  # as an earlier release named it
    again = tiny_evaluator(ds, models, out_dir=tmp_path, resume=True).cell("victim", DefenseSpec("none"), attack)
    assert again["attack"] == attack.name and again["robust_acc"] == row["robust_acc"]


def test_resume_does_not_reuse_what_the_same_weights_made_under_a_row_set_up_otherwise(tmp_path: Path) -> None:
    """The resume keys held a model's weights (the file's sha256) but not how its registry row feeds them:
    after fixing a row (its normalization, its shortcut) ``--resume`` gave the cells of the broken row."""
    ds = tiny_dataset(16)
    x = ds.images.float() / 255
    models = tiny_models()
    fixed = {**models, "victim": make_tiny_model(4, name="victim", mean=(0.9, 0.1, 0.5), std=(0.05, 0.3, 0.1)),
             "bb": make_tiny_model(0, name="bb", mean=(0.9, 0.1, 0.5), std=(0.05, 0.3, 0.1))}  # fmt: skip
    fixed = {k: m.to(TEST_DEVICE) for k, m in fixed.items()}
    for name in ("victim", "bb"):  # the same weights file under both rows
        models[name].weights_sha256 = fixed[name].weights_sha256 = f"{name}-file"
    labels = predict(fixed["victim"], x)
    assert not torch.equal(predict(models["victim"], x), labels)  # the row changes what the victim answers
    data = Dataset(ds.root, ds.paths, ds.images, labels)
    none = DefenseSpec("none")
    before = tiny_evaluator(data, models, out_dir=tmp_path, resume=True).cell("victim", none, None)["clean_acc"]
    assert before < 100
    assert tiny_evaluator(data, fixed, out_dir=tmp_path, resume=True).cell("victim", none, None)["clean_acc"] == 100.0
    spec, out = fp_spec(labels="backbone"), tmp_path / "fp"
    first = tiny_evaluator(data, models, out_dir=out, resume=True).defend(spec)
    refixed = tiny_evaluator(data, {**models, "bb": fixed["bb"]}, out_dir=out, resume=True).defend(spec)
    assert not torch.equal(first.images, refixed.images)
    assert len(list((out / "defenses").glob("*.pt"))) == 2
    # the setups are recorded beside the weights' sha256
    run = tiny_evaluator(data, fixed).provenance(["victim"])
    assert run["setup_sha256"] == {"victim": fixed["victim"].config.setup_sha256}


def test_the_run_record_says_whether_a_weights_sha256_is_a_file_s_or_a_state_s() -> None:
    """timm's own weights (no file) record their state's sha256, which run.json labelled as a file's."""
    from preempt_cli.models import state_sha256

    models = tiny_models()
    models["victim"].weights_sha256 = "f" * 64  # as load_model sets it from the weights file
    run = tiny_evaluator(tiny_dataset(), models).provenance(["victim", "bb"])
    assert run["weights_sha256"] == {"victim": "f" * 64, "bb": state_sha256(models["bb"])}
    assert run["weights_sha256_of"] == {"victim": "file", "bb": "state"}


def test_a_resumed_defense_keeps_its_budget_for_the_perturbation_maps(tmp_path: Path) -> None:
    """A resumed defended set lost its budget: the report drew its perturbation maps over [-linf, linf]
    instead of [-eps, eps], another figure than an uninterrupted run's wherever the defense did not use
    the whole budget."""
    spec = fp_spec(eta="0.1", forward="1", backward="0")  # moves an image a fraction of its budget
    ds, models = tiny_dataset(4), tiny_models()
    computed = tiny_evaluator(ds, models, out_dir=tmp_path).defend(spec)
    assert 0 < computed.linf < computed.meta["eps"]
    resumed = tiny_evaluator(ds, models, out_dir=tmp_path, resume=True).defend(spec)
    assert torch.equal(resumed.images, computed.images)
    assert resumed.meta == computed.meta


def test_a_pgd_cell_is_the_same_at_any_attack_batch_size_and_one_of_the_old_starts_is_computed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PGD drew its random starts by an image's place in its batch (one generator per batch), so a cell
    depended on the attack batch size (and on which images ``limit`` put together), and its resume key held
    that size. The starts are per image now: the same images come out right at any attack batch size, a
    cell is resumed at another one, and a cell file of the old starts, under the name 0.23.0 gave it, is
    computed again rather than taken for one of the new. AutoAttack still draws per batch (the reference
    code's): its cells stay per attack batch size. Clean cells attack nothing."""
    victim = make_per_image_model(name="victim").to(TEST_DEVICE)  # its images' outputs do not follow the batch
    images = tiny_dataset(16).images
    labels = predict(victim, images.float().div(255))  # all clean-correct, so that every image is attacked
    ds, models = tiny_dataset(16, labels=labels), tiny_models(victim=victim)
    attack, none = AttackSpec.parse("pgd:steps=1,step_size=1/255,restarts=2"), DefenseSpec("none")

    def run(batch: int, attack: AttackSpec | None, out: Path = tmp_path, resume: bool = True) -> Evaluator:
        ev = tiny_evaluator(ds, models, out_dir=out, resume=resume, attack_batch_size=batch)
        ev.cell("victim", none, attack)
        return ev

    def robust_correct(out: Path) -> str:
        (cell,) = (out / "cells").glob("*.json")
        return json.loads(cell.read_text())["robust_correct"]

    assert run(250, attack).provenance()["resumed"]["cells"] == 0
    assert run(3, attack).provenance()["resumed"]["cells"] == 1  # another attack batch size: the same cell
    assert len(list((tmp_path / "cells").glob("*.json"))) == 1
    assert "0" in robust_correct(tmp_path) and "1" in robust_correct(tmp_path)  # the attack fools some only
    for batch in (3, 5):  # computed afresh at another batch size: the same images right
        assert robust_correct(run(batch, attack, tmp_path / f"at-{batch}", resume=False).out_dir) == \
            robust_correct(tmp_path)  # fmt: skip
    assert run(250, attack).provenance()["attacks"][0]["starts"] == "per-image"
    # a cell file of the old starts is not resumed
    old = tmp_path / "old"
    ev = run(250, attack, old)
    (cell,) = (old / "cells").glob("*.json")
    cell.rename(cell.with_name(f"{_cell_key_of_0_23(ev, 'victim', none, attack)}.json"))
    assert run(250, attack, old).provenance()["resumed"]["cells"] == 0
    # AutoAttack's cells stay per attack batch size; clean cells do not depend on it
    monkeypatch.setattr(attacks_module, "_import_autoattack", lambda: FAKE_AUTOATTACK_MODULE)
    aa = AttackSpec.parse("aa")
    assert run(250, aa).provenance()["resumed"]["cells"] == 0
    assert run(250, aa).provenance()["resumed"]["cells"] == 1  # the same batch size: reused
    assert run(3, aa).provenance()["resumed"]["cells"] == 0  # another one: computed afresh
    run(250, None)
    assert run(3, None).provenance()["resumed"]["cells"] == 1


def test_the_run_record_holds_what_runs_it_again() -> None:
    """``run.json`` named the data folder and a fingerprint, the models' sha256, but not which image files,
    the batch sizes (a Bi-Level set and PGD's random starts depend on them), the other packages' versions,
    nor the settings a defense or attack left to its defaults, its seed among them: a reader could check a
    figure but not compute it again."""
    ds, models = tiny_dataset(4), tiny_models()
    ev = tiny_evaluator(ds, models, attack_batch_size=3)
    fp = fp_spec(seed="5")
    bilevel = DefenseSpec("bi-level", (("backbone", "bb"), ("labels", "backbone"), ("steps", "1")))
    for spec in (DefenseSpec("none"), fp, bilevel):
        ev.cell("victim", spec, AttackSpec.parse("pgd:steps=1"))
    run = ev.provenance(["victim"])
    assert run["image_files"] == ["000.png", "001.png", "002.png", "003.png"]
    assert (run["batch_size"], run["attack_batch_size"]) == (4, 3)
    assert set(run["packages"]) == {"timm", "numpy", "pyautoattack"}
    defenses = {d["kind"]: d for d in run["defenses"]}
    assert defenses["none"] == {"name": "none", "kind": "none", "options": {}}
    assert defenses["fast-preemption"]["seed"] == 5 and defenses["fast-preemption"]["eta"] == 0.7  # paper preset
    assert defenses["fast-preemption"]["samples"] == 2 and defenses["fast-preemption"]["precision"] == "fp32"
    assert {k: defenses["bi-level"][k] for k in ("seed", "steps", "inner_steps", "eta", "optimizer", "starts")} == {
        "seed": 0, "steps": 1, "inner_steps": 20, "eta": 0.1, "optimizer": "sign", "starts": "per-image"}
    (attack,) = run["attacks"]
    assert attack == {"name": "PGD-1 Linf 8/255", "kind": "pgd", "norm": "Linf", "eps": pytest.approx(8 / 255),
                      "seed": 0, "limit": None, "steps": 1, "step_size": pytest.approx(2 / 255), "restarts": 1,
                      "starts": "per-image"}  # how its random starts are drawn
    # the reversion protocol records its own settings, the seed of its flipped labels among them
    res = reversion_protocol(tiny_evaluator(ds, models), victims=["victim"], defense=fp_spec(),
                             black_box_backbone="other", flip_fraction=0.5, seed=7)  # fmt: skip
    assert res["settings"]["seed"] == 7 and res["settings"]["flip_fraction"] == 0.5
    assert res["settings"]["defense"]["labels"] == "ground-truth"  # flipped ground truth, as it protected


@needs_shared
@pytest.mark.shared
def test_eval_records_its_command_options_in_run_json(tmp_path: Path) -> None:
    args = ["eval", str(CIFAR), "--limit", "2", "--victim", "cifar10-resnet20-pgdat-b", *COMMON, "--defense", "none",
            "--attack", "pgd:steps=1", "--out", str(tmp_path), "-q", "--seed", "3"]  # fmt: skip
    assert invoke(args).exit_code == 0
    run = json.loads((tmp_path / "run.json").read_text())
    options = run["command_options"]
    assert options["limit"] == 2 and options["seed"] == 3 and options["attack"] == ["pgd:steps=1"]
    assert options["data"] == str(CIFAR) and options["batch_size"] is None  # as given; the one used is beside it
    assert run["batch_size"] in (50, 256)  # the default of the device it ran on


def test_the_report_says_how_wide_an_accuracy_s_interval_is_at_its_n() -> None:
    """The grid tests no row against another, and report.md said nothing of n: `--limit 8` gave "87.5 ->
    100" as if it were a finding. It now gives the widest Wilson 95% interval at the smallest n of its rows."""
    from preempt_cli.cli._eval import _precision_note

    small = _precision_note([{"n": 932}, {"n": 8}])
    assert "on 8 images" in small and "±34.6 points" in small and "not tested" in small
    assert "±3.2 points" in _precision_note([{"n": 932}])
    assert _precision_note([]) == ""


def _wilson(right: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of ``right`` of ``n``, in points, from its textbook formula."""
    p = right / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return 100 * (center - half), 100 * (center + half)


@pytest.mark.parametrize("n", [1, 2, 8, 16, 40, 932])
def test_the_report_s_interval_holds_every_accuracy_s_interval_each_way(n: int) -> None:
    """"Up to ±X points each way" was the half-width at 50%, but an accuracy off 50% lies off its interval's
    centre: 8 of 8 right is [67.6, 100], 32.4 points below where the report said ±28.5; 1 of 1, [20.7, 100].
    X is now the farthest an accuracy measured on n images lies from either end of its interval."""
    from preempt_cli.cli._eval import _precision_note

    farthest = max(max(100 * k / n - _wilson(k, n)[0], _wilson(k, n)[1] - 100 * k / n) for k in range(n + 1))
    note = _precision_note([{"n": n}])
    assert f"on {n} image{'s' if n > 1 else ''} its 95% confidence interval" in note
    assert f"±{farthest:.1f} points" in note


def test_a_bilevel_defense_is_not_warned_about_fast_preemption_s_step_rule(caplog: pytest.LogCaptureFixture) -> None:
    """Bi-Level takes only its budget from Algorithm 1's settings; its own eta went into them too, and the
    paper's eta=0.1 for Bi-Level, written out, was warned about as Fast Preemption's (0.1 x 3 steps < 1)."""
    ev = tiny_evaluator(tiny_dataset(4), tiny_models())
    spec = DefenseSpec.parse("bilevel:backbone=bb,labels=backbone,eta=0.1,steps=1,inner_steps=1")
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        defended = ev.defend(spec)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert defended.meta["eps"] == pytest.approx(8 / 255)
    assert ev.defense_settings(spec)["eta"] == 0.1


def test_lpips_that_fails_to_build_is_a_note_not_a_failed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """lpips_status checks that the pieces are there; building LPIPS can still fail (a damaged checkpoint,
    a torchvision the package does not fit). That stopped eval after the defense was computed, and again
    at every --resume; it is now reported as LPIPS being unavailable, as a missing piece is."""
    from preempt_cli import quality

    def broken(net: str = "alex", **kwargs: object) -> nn.Module:
        raise quality.LpipsUnavailableError("building LPIPS (alex) failed: RuntimeError: damaged checkpoint")

    monkeypatch.setattr(quality, "lpips_status", lambda net="alex": (True, ""))
    monkeypatch.setattr(quality, "load_lpips", broken)
    ev = tiny_evaluator(tiny_dataset(4), tiny_models())
    defended = ev.defend(fp_spec())
    assert defended.lpips is None
    assert "damaged checkpoint" in defended.lpips_note and defended.ssim is not None


def test_a_clean_grid_pairs_clean_accuracy_and_a_grid_without_none_pairs_nothing(tmp_path: Path) -> None:
    """paired_with_none on a grid without attacks tests clean accuracy alone, from the images' correctness
    the cells measured (here: the victim's answers, predicted again); without a ``none`` defense there is
    nothing to pair with, and the report says so instead of a table."""
    from preempt_cli.cli._eval import _paired_lines

    models = tiny_models(victim=level_sum_classifier())  # its answer moves with the pixels a defense changes
    ds0 = tiny_dataset(8)
    defended = tiny_evaluator(ds0, models).defend(fp_spec()).images
    before = predict(models["victim"], ds0.images.float() / 255)
    after = predict(models["victim"], defended.float() / 255)
    labels = torch.where(torch.arange(8) % 2 == 0, before, after)  # where they differ: even images lost, odd gained
    ds = Dataset(ds0.root, ds0.paths, ds0.images, labels)
    ev = tiny_evaluator(ds, models, out_dir=tmp_path)
    rows = list(ev.grid(["victim"], [DefenseSpec("none"), fp_spec()], []))
    (pair,) = ev.paired_with_none()
    none_ok, defended_ok = before == labels, after == labels
    assert (pair["metric"], pair["attack"], pair["n"]) == ("clean_acc", "none", 8)
    assert (pair["gained"], pair["lost"], pair["p_value"]) == mcnemar_exact(none_ok, defended_ok)
    assert pair["p_holm"] == pair["p_value"]  # one test: nothing to adjust for
    assert pair["gained"] == int((before != after)[1::2].sum()) and pair["lost"] == int((before != after)[::2].sum())
    assert pair["gained"] and pair["lost"]
    assert pair["gain_points"] == round(100 * (pair["gained"] - pair["lost"]) / 8, 2)
    assert (pair["none_acc"], pair["defense_acc"]) == (rows[0]["clean_acc"], rows[1]["clean_acc"])
    for path in (tmp_path / "cells").glob("*.json"):
        cell = json.loads(path.read_text())
        assert cell["robust_correct"] is None
        assert cell["clean_correct"] == "".join("1" if ok else "0" for ok in (none_ok if cell["defense"] == "none"
                                                                            else defended_ok).tolist())  # fmt: skip
    alone = tiny_evaluator(ds, models)
    list(alone.grid(["victim"], [fp_spec()], []))
    assert alone.paired_with_none() == []
    assert "No paired test: the run has no `none` defense to pair with." in _paired_lines([], [fp_spec()])


def _one_right_only_defended(n: int) -> tuple[dict[str, nn.Module], Dataset]:
    """Tiny models and ``n`` images whose labels the victim gets wrong on every image without a defense, and
    right on one image only with :func:`fp_spec`'s: 1 of ``n`` right, and gained, on the defended images."""
    models = tiny_models(victim=level_sum_classifier())  # its answer moves with the pixels a defense changes
    ds0 = tiny_dataset(n)
    defended = tiny_evaluator(ds0, models).defend(fp_spec()).images
    before = predict(models["victim"], ds0.images.float() / 255)
    after = predict(models["victim"], defended.float() / 255)
    labels = torch.tensor([min({*range(10)} - {int(b), int(a)}) for b, a in zip(before, after)])  # neither's
    (changed,) = (before != after).nonzero()[0].tolist()
    labels[changed] = after[changed]
    return models, Dataset(ds0.root, ds0.paths, ds0.images, labels)


def test_one_count_is_one_figure_in_the_rows_the_paired_tests_and_the_report(tmp_path: Path) -> None:
    """1 image of 160 is 0.625%: a row gave 0.63 (the float32 mean, rounded), the paired test's gain of the
    same one image 0.62 (a float division, rounded), and the report showed both. Every figure is now the
    exact count rounded half to even: 0.62 in the row, in results.json and the CSV, in the paired record and
    in the report's table."""
    import csv
    import io

    from preempt_cli.cli._eval import _csv_text, _paired_lines
    from preempt_cli.evaluate import json_dumps

    models, ds = _one_right_only_defended(160)
    ev = tiny_evaluator(ds, models, out_dir=tmp_path)
    none_row, fp_row = ev.grid(["victim"], [DefenseSpec("none"), fp_spec()], [])
    (pair,) = ev.paired_with_none()
    assert (none_row["clean_acc"], pair["gained"], pair["lost"], pair["n"]) == (0.0, 1, 0, 160)
    assert fp_row["clean_acc"] == pair["defense_acc"] == pair["gain_points"] == float(round(Fraction(100, 160), 2))
    assert json.loads(json_dumps([none_row, fp_row]))[1]["clean_acc"] == 0.62
    assert [r["clean_acc"] for r in csv.DictReader(io.StringIO(_csv_text([none_row, fp_row])))] == ["0.0", "0.62"]
    lines = _paired_lines([pair], [DefenseSpec("none"), fp_spec()])
    (line,) = [line for line in lines if line.startswith(f"| victim | {fp_spec().name} |")]
    assert "| 160 | 0 | 0.62 | +0.62 | 1 | 0 |" in line
    resumed = tiny_evaluator(ds, models, out_dir=tmp_path, resume=True)  # the cell files hold the same figure
    assert list(resumed.grid(["victim"], [DefenseSpec("none"), fp_spec()], [])) == [none_row, fp_row]
    assert resumed.paired_with_none() == [pair]


def test_a_cell_file_of_0_27_holding_a_tie_rounded_otherwise_is_resumed_and_reported_as_computed_now(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """preempt 0.27.0 wrote a cell's accuracy as the float32 mean rounded: 0.63 for 1 image of 160. Such a
    file is still the cell's (its correctness gives that figure as 0.27.0 computed it), so it is resumed, not
    computed again; its row gives the figure as this release computes it from the file's correctness, as an
    uninterrupted run would."""
    models, ds = _one_right_only_defended(160)
    ev = tiny_evaluator(ds, models, out_dir=tmp_path)
    list(ev.grid(["victim"], [DefenseSpec("none"), fp_spec()], []))
    (path,) = [p for p in (tmp_path / "cells").glob("*.json") if json.loads(p.read_text())["defense"] != "none"]
    cell = json.loads(path.read_text())
    assert (cell["clean_correct"].count("1"), cell["clean_acc"]) == (1, 0.62)
    written_by_0_27 = {**cell, "clean_acc": 0.63, "computed_by": {**cell["computed_by"], "preempt": "0.27.0"}}
    path.write_text(json.dumps(written_by_0_27))
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        resumed = tiny_evaluator(ds, models, out_dir=tmp_path, resume=True)
        rows = list(resumed.grid(["victim"], [DefenseSpec("none"), fp_spec()], []))
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    assert [was_resumed for was_resumed, _ in resumed._origins["cells"]] == [True, True]
    assert rows[1]["clean_acc"] == 0.62
    (pair,) = resumed.paired_with_none()
    assert pair["defense_acc"] == pair["gain_points"] == 0.62
    path.write_text(json.dumps({**cell, "clean_acc": 0.64}))  # neither figure of its correctness: computed again
    with caplog.at_level(logging.WARNING, logger="preempt_cli"):
        again = tiny_evaluator(ds, models, out_dir=tmp_path, resume=True).cell("victim", fp_spec(), None)
    assert [r for r in caplog.records if "damaged" in r.getMessage()] and again["clean_acc"] == 0.62


def test_a_resumed_cell_whose_correctness_is_not_exactly_its_own_is_computed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cell file's per-image correctness was checked against its accuracy within 0.01 points (one image of
    10,000 passed), a NaN accuracy passed every check, and a file of fewer images than the cell's (its bits
    and accuracy agreeing) was trusted: its pairs were tested on other images than the none cell's. The
    accuracy must now be exactly what the bits give, and n the cell's; anything else is recomputed."""
    ds, models = tiny_dataset(10000), tiny_models()
    row = tiny_evaluator(ds, models, out_dir=tmp_path).cell("victim", DefenseSpec("none"), None)
    (path,) = (tmp_path / "cells").glob("*.json")
    cell = json.loads(path.read_text())
    bits = cell["clean_correct"]
    half = bits[:5000]
    edits = {
        "fewer images": {"n": 5000, "clean_correct": half, "clean_acc": round(100 * half.count("1") / 5000, 2)},
        "NaN accuracy": {"clean_acc": float("nan")},
        "one image flipped": {"clean_correct": ("0" if bits[0] == "1" else "1") + bits[1:]},
    }
    for what, edit in edits.items():
        path.write_text(json.dumps({**cell, **edit}))  # json writes the NaN, as Python's json reads it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="preempt_cli"):
            again = tiny_evaluator(ds, models, out_dir=tmp_path, resume=True).cell("victim", DefenseSpec("none"), None)
        assert [r for r in caplog.records if "damaged" in r.getMessage()], what
        assert (again["n"], again["clean_acc"]) == (row["n"], row["clean_acc"]), what
        path.write_text(json.dumps(cell))


def test_paired_records_are_of_the_cells_as_computed_not_of_rows_a_caller_changed() -> None:
    """paired_with_none kept the very dicts cell() returned: a caller that changed a row (a renamed defense,
    accuracies as fractions) changed the paired records too, which then disagreed with the images' bits."""
    models = tiny_models()
    ev = tiny_evaluator(tiny_dataset(8), models)
    rows = list(ev.grid(["victim"], [DefenseSpec("none"), fp_spec()], []))
    expected = ev.paired_with_none()
    for row in rows:
        row.update(defense="renamed", clean_acc=row["clean_acc"] / 100, attack="changed", n=0)
    assert ev.paired_with_none() == expected


def test_defenses_are_tested_against_each_other_on_the_same_images_in_a_holm_family_of_their_own() -> None:
    """paired_with_none tested each defense against none only: whether Fast Preemption's robust accuracy
    differs from Bi-Level's on the same images could not be asked. paired_between_defenses tests every pair
    of defenses other than none (the second given against the first), from cells whose correctness is
    written here by hand: clean accuracy once, from the pair's cells of the most images; robust accuracy per
    attack both were attacked with; n/a naming a resumed cell that keeps no correctness; Holm's adjustment
    over these tests alone, the tests against none keeping theirs."""
    from preempt_cli.evaluate import _GivenCell

    ev = tiny_evaluator(tiny_dataset(8), tiny_models())
    none, a, b, c = (DefenseSpec("none"), *(DefenseSpec("folder", (("path", p),)) for p in ("a", "b", "c")))

    def given(victim: str, spec: DefenseSpec, attack: str, clean: str | None, robust: str | None,
              missing: str = "") -> _GivenCell:  # fmt: skip
        def bits(text: str | None) -> torch.Tensor | None:
            return None if text is None else torch.tensor([ch == "1" for ch in text])

        def acc(text: str | None, otherwise: float) -> float:  # a resumed file's row: its accuracies alone
            return otherwise if text is None else round(100 * text.count("1") / len(text), 2)

        row = {"victim": victim, "defense": spec.name, "attack": attack, "n": 4 if attack == "short" else 8,
               "clean_acc": acc(clean, 50.0), "robust_acc": acc(robust, 25.0)}
        return _GivenCell(victim, spec, row, bits(clean), bits(robust), missing)

    old = "the cell (folder:b, short) was resumed from old.json, which keeps no per-image correctness"
    ev._given = [
        given("v", none, "short", "1111", "1000"), given("v", none, "long", "11110000", "10000000"),
        # a's shorter cell first: clean accuracy is still paired from the longer one
        given("v", a, "short", "1111", "1100"), given("v", a, "long", "11111111", "11110000"),
        given("v", b, "short", None, None, missing=old), given("v", b, "long", "11000000", "10000000"),
        given("v", c, "long", "11100000", "11000000"),  # no short cell: its pairs have no robust record of it
        given("v", c, "long", "00000000", "00000000"),  # a cell given twice: paired once, the first
        given("w", a, "long", "11111111", "11111111"),  # one defense on w: nothing to pair there
    ]  # fmt: skip
    against_none = ev.paired_with_none()
    between = ev.paired_between_defenses()
    assert ev.paired_with_none() == against_none  # the families are adjusted apart: neither changes the other
    assert [p["p_holm"] for p in against_none if p["p_value"] is not None] == holm_adjusted(
        [p["p_value"] for p in against_none if p["p_value"] is not None])

    got = [(r["victim"], r["first"], r["second"], r["metric"], r["attack"], r["n"], r["first_acc"], r["second_acc"],
            r["gain_points"], r["gained"], r["lost"], r["p_value"]) for r in between]  # fmt: skip
    # by hand: second minus first; gained: right only with the second; p: 2 * P(Binomial(d, 1/2) <= min) capped
    assert got == [
        ("v", "folder:a", "folder:b", "clean_acc", "long", 8, 100.0, 25.0, -75.0, 0, 6, 2 / 2**6),
        ("v", "folder:a", "folder:b", "robust_acc", "short", 4, 50.0, 25.0, None, None, None, None),
        ("v", "folder:a", "folder:b", "robust_acc", "long", 8, 50.0, 12.5, -37.5, 0, 3, 2 / 2**3),
        ("v", "folder:a", "folder:c", "clean_acc", "long", 8, 100.0, 37.5, -62.5, 0, 5, 2 / 2**5),
        ("v", "folder:a", "folder:c", "robust_acc", "long", 8, 50.0, 25.0, -25.0, 0, 2, 2 / 2**2),
        ("v", "folder:b", "folder:c", "clean_acc", "long", 8, 25.0, 37.5, 12.5, 1, 0, 1.0),
        ("v", "folder:b", "folder:c", "robust_acc", "long", 8, 12.5, 25.0, 12.5, 1, 0, 1.0),
    ]  # fmt: skip
    assert between[1]["not_tested"] == old and all(r["not_tested"] is None for r in between if r is not between[1])
    assert between[1]["p_holm"] is None
    # Holm over the six tested here, by hand: 1/32 x 6, 1/16 x 5, 1/4 x 4, then capped at 1
    assert [r["p_holm"] for r in between if r["p_value"] is not None] == pytest.approx(
        [0.1875, 1.0, 0.3125, 1.0, 1.0, 1.0])
    assert list(between[0]) == ["victim", "first", "second", "metric", "attack", "n", "first_acc", "second_acc",
                                "gain_points", "gained", "lost", "p_value", "p_holm", "not_tested"]  # fmt: skip

    ev._given = [cell for cell in ev._given if cell.spec.kind == "none" or cell.spec is a]
    assert ev.paired_between_defenses() == []  # one defense besides none


def test_the_evaluated_images_are_the_same_floats_on_every_device() -> None:
    """``eval`` sent its 8-bit images to the device as ``x / 255``, which a GPU computes as a product with
    the reciprocal (emulated here on the CPU): other floats than the CPU's, off the 8-bit grid PGD reads an
    image's levels from for its random starts, so a GPU drew other starts for the same images."""
    images = (torch.arange(3 * 16 * 16) % 256).to(torch.uint8).view(1, 3, 16, 16)  # every level
    with CudaLikeDivision():
        x = evaluate_module._to_float(images, torch.device("cpu"))
    assert torch.equal(x, images.float() / 255)
