"""Preemptive Reversion (Algorithm 2, Eq. 13) on tiny models: the formula, and that it moves against the
defense's own perturbation."""

from __future__ import annotations

import torch

from conftest import TEST_DEVICE, make_tiny_model
from preempt_cli import FastPreemption, ForeBackConfig
from preempt_cli.imageio import levels_to_float
from preempt_cli.revert import Reverter


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(TEST_DEVICE)


def test_reversion_is_twice_the_image_minus_the_defense_of_it() -> None:
    backbone = make_tiny_model(0).to(TEST_DEVICE)
    config = ForeBackConfig(samples=3)
    x = _images()
    y = torch.tensor([0, 3, 5, 9], device=TEST_DEVICE)
    reverted = Reverter(backbone, labels="backbone", config=config, seed=7).transform(x, y, noise_seeds=[1, 2, 3, 4])
    defended = FastPreemption(backbone, config=config, seed=7).perturb(x, y, noise_seeds=[1, 2, 3, 4])
    torch.testing.assert_close(reverted, (2 * x - defended).clamp(0, 1), atol=1e-6, rtol=0)
    # x~ - x = -(D(x) - x) wherever [0, 1] does not clip: the defense's step, taken backwards
    inside = ((2 * x - defended) > 0) & ((2 * x - defended) < 1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close((reverted - x)[inside], -(defended - x)[inside], atol=1e-6, rtol=0)
    assert (defended - x).abs().max() > 0.5 * config.eps  # the defense moved: the check is not of zeros
    assert (reverted - x).abs().max() <= config.eps + 1e-6
    # x in another dtype: computed, and returned, in float32 as the engine does (it came back as float64)
    as_double = Reverter(backbone, labels="backbone", config=config, seed=7).transform(x.double(), y, noise_seeds=[1, 2, 3, 4])
    assert as_double.dtype == torch.float32 and torch.equal(as_double, reverted)


def test_reversion_labels_with_its_own_models() -> None:
    # Algorithm 2: the reverter labels x^r itself (its classifier, or its backbone): not the defender's labels
    backbone, classifier = make_tiny_model(0).to(TEST_DEVICE), make_tiny_model(1, name="clf").to(TEST_DEVICE)
    x = _images()
    by_classifier = Reverter(backbone, classifier, config=ForeBackConfig(samples=2))
    by_backbone = Reverter(backbone, labels="backbone", config=ForeBackConfig(samples=2))
    assert torch.equal(by_classifier.predict(x), classifier(x).argmax(1))
    assert torch.equal(by_backbone.predict(x), backbone(x).argmax(1))
    # labels from folders or a label file label files; images given as tensors are labelled by the classifier
    by_folders = Reverter(backbone, classifier, config=ForeBackConfig(samples=2), labels="folders")
    assert torch.equal(by_folders.predict(x), classifier(x).argmax(1))
    assert not torch.equal(classifier(x).argmax(1), backbone(x).argmax(1))  # the check tells the two apart


def test_reverter_run_on_paths_reverts_protected_files_into_reverted_names(tmp_path) -> None:
    """The library as ``preempt revert``: ``Reverter.run(["folder"])`` found no protected file (the walk left
    them out as outputs) and, given an original, wrote ``a.protected.png`` holding a reverted image."""
    from conftest import write_random_pngs
    from preempt_cli import Protector, RunOptions
    from preempt_cli.protect import read_preempt_metadata_file

    backbone = make_tiny_model(0).to(TEST_DEVICE)
    config = ForeBackConfig(samples=1, backward_steps=1)
    write_random_pngs(tmp_path, n=2)
    protected = [r.output for r in Protector(backbone, labels="backbone", config=config).run([tmp_path])]
    assert [p.name for p in protected] == ["img0.protected.png", "img1.protected.png"]
    reverter = Reverter(backbone, labels="backbone", config=config)
    results = list(reverter.run(tmp_path))  # the originals and the protected files, as the CLI takes them
    assert sorted(r.input.name for r in results if r.status == "done") == ["img0.png", "img0.protected.png",
                                                                          "img1.png", "img1.protected.png"]  # fmt: skip
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["img0.png", "img0.protected.png", "img0.protected.reverted.png", "img0.reverted.png",
                       "img1.png", "img1.protected.png", "img1.protected.reverted.png", "img1.reverted.png"]
    assert all(read_preempt_metadata_file(tmp_path / f"img{i}.protected.png")["kind"] == "protected" for i in (0, 1))
    assert read_preempt_metadata_file(tmp_path / "img0.protected.reverted.png")["kind"] == "reverted"
    # a run again skips its outputs; a suffix given is kept
    assert {r.status for r in reverter.run(tmp_path)} == {"skipped"}
    list(reverter.run([tmp_path / "img0.protected.png"], RunOptions(suffix="_undone")))
    assert (tmp_path / "img0.protected_undone.png").exists()


def test_a_revert_suffix_that_protected_names_end_with_still_takes_them(tmp_path) -> None:
    """``revert --suffix d``: ``a.protected.png`` ends like the suffix and carries preempt's metadata, and the
    folder walk left it out as if it were a reverted output: the run did nothing, with exit 0. Only
    outputs of the run's own kind are left out, and a second run skips what the first wrote."""
    from conftest import write_random_pngs
    from preempt_cli import Protector, RunOptions
    from preempt_cli.errors import ConfigError
    from preempt_cli.protect import read_preempt_metadata_file

    backbone = make_tiny_model(0).to(TEST_DEVICE)
    config = ForeBackConfig(samples=1, backward_steps=1)
    write_random_pngs(tmp_path, n=1)
    list(Protector(backbone, labels="backbone", config=config).run([tmp_path]))
    reverter = Reverter(backbone, labels="backbone", config=config)
    first = {r.input.name: r.status for r in reverter.run(tmp_path, RunOptions(suffix="d"))}
    assert first == {"img0.png": "done", "img0.protected.png": "done"}
    assert read_preempt_metadata_file(tmp_path / "img0.protectedd.png")["kind"] == "reverted"
    again = {r.input.name: r.status for r in reverter.run(tmp_path, RunOptions(suffix="d"))}
    assert again == {"img0.png": "skipped", "img0.protected.png": "skipped"}  # img0d.png, img0.protectedd.png out
    # a suffix ending with the other command's marker names its outputs: refused before any work
    # (_v.reverted was taken: protect wrote img0_v.reverted.png, which revert's walks then left out)
    protector = Protector(backbone, labels="backbone", config=config)
    for runner, suffix, marker in ((reverter, ".protected", ".protected"), (protector, ".reverted", ".reverted"),
                                   (protector, "_v.reverted", ".reverted"), (reverter, "-x.protected", ".protected")):  # fmt: skip
        try:
            list(runner.run(tmp_path, RunOptions(suffix=suffix)))
        except ConfigError as error:
            assert f"--suffix {suffix} ends with {marker}, which marks the outputs of preempt" in str(error)
        else:
            raise AssertionError(f"{suffix} was taken")


def test_protect_skips_a_reversions_output_whatever_its_name(tmp_path) -> None:
    """``revert --suffix .rv`` wrote ``a.protected.rv.png``; a protect of the folder then protected that
    reversion output (into ``a.protected.rv.protected.png``): only outputs of its own kind were skipped."""
    from conftest import write_random_pngs
    from preempt_cli import Protector, RunOptions

    backbone = make_tiny_model(0).to(TEST_DEVICE)
    config = ForeBackConfig(samples=1, backward_steps=1)
    write_random_pngs(tmp_path, n=1)
    protector = Protector(backbone, labels="backbone", config=config)
    list(protector.run([tmp_path]))
    list(Reverter(backbone, labels="backbone", config=config).run([tmp_path / "img0.protected.png"], RunOptions(suffix=".rv")))
    results = {r.input.name: r for r in protector.run([tmp_path])}
    assert results["img0.protected.rv.png"].status == "skipped"
    assert results["img0.protected.rv.png"].reason == "already reverted by preempt (a reversion's output; --overwrite protects it anyway)"
    assert not (tmp_path / "img0.protected.rv.protected.png").exists()


def test_white_box_with_the_real_key_is_deterministic_and_refuses_other_weights_of_its_name(
        tmp_path, shared_models_dir, cifar_batch_paths, isolated_config) -> None:  # fmt: skip
    """``preempt revert --white-box`` on real CIFAR-10 images protected with ``cifar10-resnet20-pgdat-a``:
    the same bytes run after run (whatever the batching), outputs beside the protected files, originals
    untouched; and where the registry's row of that name now loads other weights (pgdat-b's file), the files
    fail rather than being reverted black-box as if white-box, unless --allow-changed-models."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from conftest import TEST_DEVICE_ARG
    from preempt_cli.cli import app

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in cifar_batch_paths[:3]:
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    common = ["--models-dir", str(shared_models_dir), "--device", TEST_DEVICE_ARG]

    def cli(*args: str):
        return CliRunner().invoke(app, [*args, *common], catch_exceptions=False)

    protected = cli("protect", str(folder), "-b", "cifar10-resnet20-pgdat-a", "-c", "cifar10-resnet18-std",
                    "-n", "2", "--backward", "1")  # fmt: skip
    assert protected.exit_code == 0, protected.stderr

    def digests(where) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(where.glob("*.reverted.png"))}

    first = cli("revert", str(folder), "--white-box", "--json")
    assert first.exit_code == 0, first.stderr
    done = [r for r in map(json.loads, first.stdout.splitlines()) if r["status"] == "done"]
    assert sorted(Path(r["output"]).name for r in done) == sorted(f"{Path(n).stem}.protected.reverted.png"
                                                                 for n in originals)  # fmt: skip
    again = cli("revert", str(folder), "--white-box", "-o", str(tmp_path / "again"), "--batch-size", "1",
                "--workers", "1")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert digests(folder) == digests(tmp_path / "again") and len(digests(folder)) == 3
    assert {p.name: p.read_bytes() for p in folder.glob("*") if p.name in originals} == originals
    # the same name, other weights: pgdat-b's file under pgdat-a's row
    swapped = tmp_path / "swapped.toml"
    swapped.write_text('[models.cifar10-resnet20-pgdat-a]\nbase = "cifar10-resnet20-pgdat-b"\n')
    out = tmp_path / "swapped"
    refused = cli("revert", str(folder), "--white-box", "--registry", str(swapped), "-o", str(out), "--json")
    rows = [json.loads(line) for line in refused.stdout.splitlines()]
    assert refused.exit_code == 1 and {r["status"] for r in rows if "protected" in r["input"]} == {"failed"}
    assert all("differs from the weights that protected 3 file(s)" in r["reason"] for r in rows
               if r["status"] == "failed")  # fmt: skip
    assert not digests(out)
    allowed = cli("revert", str(folder), "--white-box", "--registry", str(swapped), "-o", str(out),
                  "--allow-changed-models")  # fmt: skip
    assert allowed.exit_code == 0 and len(digests(out)) == 3, allowed.stderr
    assert "differs from the weights that protected 3 file(s)" in allowed.stderr
    assert digests(out) != digests(folder)  # another backbone: another reversion


def test_reverting_levels_gives_the_bits_of_reverting_their_floats() -> None:
    # the pipeline reverts a file from its levels (transform_levels), a photo's floats not held meanwhile
    backbone = make_tiny_model(0).to(TEST_DEVICE)
    reverter = Reverter(backbone, labels="backbone", config=ForeBackConfig(samples=2), seed=7)
    g = torch.Generator().manual_seed(4)
    y = torch.tensor([2, 6], device=TEST_DEVICE)
    for size in ((32, 32), (40, 56)):  # the backbone's input size, and a photo it resizes
        levels = torch.randint(0, 256, (2, 3, *size), generator=g, dtype=torch.uint8).to(TEST_DEVICE)
        expected = reverter.transform(levels_to_float(levels, 255), y, noise_seeds=[1, 2])
        assert torch.equal(reverter.transform_levels(levels, 255, y, noise_seeds=[1, 2]), expected)
        assert not torch.equal(expected, levels_to_float(levels, 255))
