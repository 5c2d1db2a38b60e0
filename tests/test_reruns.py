"""Re-runs of ``Protector.run`` / ``Reverter.run`` over existing outputs: what is skipped as done, and what
fails (kept, never silently taken for this run's result)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import TEST_DEVICE, avif_without_its_image, make_tiny_model, write_random_pngs
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs
from preempt_cli.imageio import read_png_text
from preempt_cli.protect import differing_settings
from preempt_cli.revert import Reverter

FAST = dict(samples=2)


def _protector(seed: int = 0, *, name: str = "tiny-key", run_seed: int = 0, cls=Protector, **config) -> Protector:
    backbone = make_tiny_model(seed, name=name).to(TEST_DEVICE)
    # what load_model sets: the key is known by its weights' bytes
    backbone.weights_sha256 = hashlib.sha256(f"weights {seed}".encode()).hexdigest()
    return cls(backbone, labels="backbone", config=ForeBackConfig(**{**FAST, **config}), seed=run_seed)


def _run(protector: Protector, folder: Path, **options) -> dict[str, tuple[str, str]]:
    results = protector.run(collect_inputs([folder]), RunOptions(**options))
    return {r.input.name: (r.status, r.reason or "") for r in results}


def test_rerun_with_the_same_settings_skips(tmp_path: Path) -> None:
    write_random_pngs(tmp_path, n=2)
    assert {s for s, _ in _run(_protector(), tmp_path).values()} == {"done"}
    again = _run(_protector(), tmp_path)
    assert {s for s, _ in again.values()} == {"skipped"}, again


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(seed=1), "backbone"),  # another key: a protect with the public model, then with one's own
        (dict(eps=4 / 255), "eps 8/255 -> 4/255"),
        (dict(samples=3), "samples"),
        (dict(run_seed=5), "seed"),
        (dict(eta=1.0), "eta"),
    ],
)  # fmt: skip
def test_rerun_with_other_settings_fails_and_keeps_the_old_output(tmp_path: Path, change: dict, named: str) -> None:
    write_random_pngs(tmp_path, n=2)
    _run(_protector(), tmp_path)
    outputs = sorted(tmp_path.glob("*.protected.png"))
    before = {p: p.read_bytes() for p in outputs}
    again = _run(_protector(**change), tmp_path)
    assert {s for s, _ in again.values()} == {"failed"}, again
    assert all(named in reason and "--overwrite" in reason for _, reason in again.values()), again
    assert {p: p.read_bytes() for p in outputs} == before
    redone = _run(_protector(**change), tmp_path, overwrite=True)
    assert {s for s, _ in redone.values()} == {"done"}
    assert all(p.read_bytes() != before[p] for p in outputs)


def test_a_missing_or_piped_input_beside_its_output_fails_and_keeps_the_output(tmp_path: Path) -> None:
    """``protect gone.png`` with ``gone.protected.png`` there: "skipped, output exists" and exit 0, as if done
    (the original could not be hashed, so its bytes were not compared)."""
    import os

    write_random_pngs(tmp_path, n=1)
    assert {s for s, _ in _run(_protector(), tmp_path).values()} == {"done"}
    output = tmp_path / "img0.protected.png"
    before = output.read_bytes()
    (tmp_path / "img0.png").unlink()
    results = list(_protector().run([str(tmp_path / "img0.png")]))
    assert [(r.status, r.reason) for r in results] == [("failed", "no such file")]
    assert output.read_bytes() == before
    # a pipe at the original's place: read once, it would replace the output unasked
    os.mkfifo(tmp_path / "img0.png")
    (result,) = _protector().run([str(tmp_path / "img0.png")])
    assert result.status == "failed" and "a pipe cannot be compared" in result.reason and "--overwrite" in result.reason
    assert output.read_bytes() == before


def test_a_renamed_model_with_the_same_weights_is_the_same_key(tmp_path: Path) -> None:
    write_random_pngs(tmp_path, n=1)
    _run(_protector(name="my-key"), tmp_path)
    assert {s for s, _ in _run(_protector(name="my-key-v1"), tmp_path).values()} == {"skipped"}


def test_a_foreign_file_in_the_outputs_place_fails(tmp_path: Path) -> None:
    (image,) = write_random_pngs(tmp_path, n=1)
    junk = tmp_path / f"{image.stem}.protected.png"
    junk.write_bytes(b"not an image of ours")
    result = _run(_protector(), tmp_path)
    assert result[image.name][0] == "failed" and "not a file preempt protected" in result[image.name][1]
    assert junk.read_bytes() == b"not an image of ours"
    assert _run(_protector(), tmp_path, overwrite=True)[image.name][0] == "done"


def test_a_broken_file_of_any_format_in_an_outputs_place_fails_its_input_alone(tmp_path: Path) -> None:
    """A broken AVIF in an output's place stopped the whole run with an internal error (Pillow's AVIF plugin
    raises RuntimeError as it opens one): it fails its input as any foreign file does, and the others are done."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    first, second = write_random_pngs(tmp_path, n=2)
    junk = tmp_path / f"{first.stem}.protected.png"
    broken = avif_without_its_image()
    junk.write_bytes(broken)
    result = _run(_protector(), tmp_path)
    assert result[first.name][0] == "failed" and "not a file preempt protected" in result[first.name][1]
    assert result[second.name] == ("done", "")
    assert junk.read_bytes() == broken


def test_a_reversion_output_is_judged_by_the_reverters_settings(tmp_path: Path) -> None:
    (image,) = write_random_pngs(tmp_path, n=1)
    _run(_protector(), tmp_path)
    protected = tmp_path / f"{image.stem}.protected.png"
    reverted = Reverter(make_tiny_model(3).to(TEST_DEVICE), labels="backbone", config=ForeBackConfig(**FAST))
    first = list(reverted.run(collect_inputs([protected])))
    assert [r.status for r in first] == ["done"]
    assert [r.status for r in reverted.run(collect_inputs([protected]))] == ["skipped"]
    other = Reverter(make_tiny_model(4).to(TEST_DEVICE), labels="backbone", config=ForeBackConfig(samples=3))
    assert [r.status for r in other.run(collect_inputs([protected]))] == ["failed"]


def test_differing_settings_ignores_what_an_older_output_does_not_record() -> None:
    now = {"backbone": "k", "backbone_sha256": "a" * 64, "eps": 8 / 255, "samples": 20, "seed": 0}
    assert differing_settings({"backbone": "k", "eps": 8 / 255}, now) == []
    assert differing_settings({"backbone": "other", "backbone_sha256": "a" * 64}, now) == []
    retrained = differing_settings({"backbone": "k", "backbone_sha256": "b" * 64}, now)
    assert retrained == [f"backbone k (sha256 {'b' * 12}) -> k (sha256 {'a' * 12})"]
    assert differing_settings({"eps": 4 / 255, "samples": 20}, now) == ["eps 4/255 -> 8/255"]


def test_differing_settings_shows_values_apart_and_never_fails() -> None:
    # two budgets that print alike at 4 digits, with no backbone hashes (timm weights, older outputs)
    recorded = {"backbone": "k", "backbone_sha256": None, "eps": 0.031372}
    changed = differing_settings(recorded, {"backbone": "k", "backbone_sha256": None, "eps": 8 / 255})
    assert changed == [f"eps {0.031372!r} -> {8 / 255!r}"]
    # classifiers are compared by their weights too: renamed, the same; retrained under one name, not
    now = {"classifier": "c", "classifier_sha256": "a" * 64}
    assert differing_settings({"classifier": "c-renamed", "classifier_sha256": "a" * 64}, now) == []
    assert differing_settings({"classifier": "c", "classifier_sha256": "b" * 64}, now) == [
        f"classifier c (sha256 {'b' * 12}) -> c (sha256 {'a' * 12})"]


def test_outputs_record_nothing_of_the_original_s_name_or_folder(tmp_path: Path) -> None:
    # A protected file is made to be published: its metadata must not carry the private name it had.
    folder = tmp_path / "private-folder"
    write_random_pngs(folder, n=1, name="private-name{i}.png")
    assert {s for s, _ in _run(_protector(), folder).values()} == {"done"}
    (output,) = folder.glob("*.protected.png")
    text = json.dumps(read_png_text(output))
    assert '\\"tool\\": \\"preempt\\"' in text  # the metadata chunk is there, as JSON inside the text chunk
    assert "private-name" not in text and "private-folder" not in text


@pytest.mark.skipif(os.name == "nt", reason="flock: POSIX only (no cleaning on Windows)")
def test_a_rerun_that_skips_an_output_removes_the_temporaries_a_killed_write_of_it_left(tmp_path: Path,
                                                                                      monkeypatch) -> None:  # fmt: skip
    """A run killed while it replaced an output (--overwrite) left the output's temporary file, and a re-run
    that skipped the output (done) kept it for good: only a write of the output removed it. The skip removes
    it too, as the write would (unlocked, unchanged for 2 s, named exactly so); nothing else is touched."""
    import time

    from preempt_cli import imageio

    write_random_pngs(tmp_path, n=2)
    assert {s for s, _ in _run(_protector(), tmp_path).values()} == {"done"}
    old = time.time() - 60
    left = [tmp_path / ".img0.protected.png.k3_x9zqw.tmp", tmp_path / ".img1.protected.png.abcdefgh.tmp"]
    kept = [tmp_path / ".img0.protected.png.notours.tmp", tmp_path / ".img9.protected.png.abcdefgh.tmp"]
    for temp in left + kept:
        temp.write_bytes(b"\x89PNG cut short")
        os.utime(temp, (old, old))
    monkeypatch.setattr(imageio, "_listings", {})  # as a new process (this one listed the folder as it wrote)
    again = _run(_protector(), tmp_path)
    assert {s for s, _ in again.values()} == {"skipped"}, again
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_outputs_say_whether_a_model_s_sha256_is_its_file_s_or_its_state_s(tmp_path: Path) -> None:
    """A net without a weights file (timm's own weights) records its state's sha256, which was labelled as a
    file's: a reader looked for a file of that sha256 that cannot exist."""
    from preempt_cli.models import state_sha256
    from preempt_cli.protect import read_preempt_metadata_file

    write_random_pngs(tmp_path, n=1)
    backbone = _protector().backbone
    classifier = make_tiny_model(7, name="no-file").to(TEST_DEVICE)  # as timm's own weights: no file sha256
    protector = Protector(backbone, classifier, config=ForeBackConfig(**FAST), seed=0)
    assert {s for s, _ in _run(protector, tmp_path).values()} == {"done"}
    (output,) = tmp_path.glob("*.protected.png")
    meta = read_preempt_metadata_file(output)
    assert (meta["backbone_sha256"], meta["backbone_sha256_of"]) == (backbone.weights_sha256, "file")
    assert (meta["classifier_sha256"], meta["classifier_sha256_of"]) == (state_sha256(classifier), "state")
    # an output of an older version, without the new keys, is still these settings
    older = {k: v for k, v in meta.items() if not k.endswith("_sha256_of")}
    assert differing_settings(older, protector.run_settings()) == []
    # a reversion output says which its protector's was
    reverter = Reverter(backbone, config=ForeBackConfig(**FAST), labels="backbone", seed=0)
    assert reverter._extra_metadata(meta)["protected_with"]["backbone_sha256_of"] == "file"


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("io", ["threads", "processes"])
def test_a_private_original_gets_private_outputs(tmp_path: Path, io: str) -> None:
    """A photo only its owner may read (0600) got a protected copy, and a reversion, every user of the machine
    could read (0644 under the usual umask), though the copy shows the same picture."""
    import stat

    private, shared = write_random_pngs(tmp_path, n=2)
    os.chmod(private, 0o600)
    old = os.umask(0o022)
    try:
        assert {s for s, _ in _run(_protector(), tmp_path, io=io, workers=1).values()} == {"done"}
        reverter = Reverter(make_tiny_model(3).to(TEST_DEVICE), labels="backbone", config=ForeBackConfig(**FAST))
        results = list(reverter.run(sorted(tmp_path.glob("*.protected.png")), RunOptions(io=io, workers=1)))
        assert {r.status for r in results} == {"done"}, results
    finally:
        os.umask(old)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert (mode(f"{private.stem}.protected.png"), mode(f"{private.stem}.protected.reverted.png")) == (0o600, 0o600)
    assert (mode(f"{shared.stem}.protected.png"), mode(f"{shared.stem}.protected.reverted.png")) == (0o644, 0o644)
    assert mode(private.name) == 0o600


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_a_link_to_nowhere_at_an_output_is_kept_until_overwrite(tmp_path: Path) -> None:
    """A link the user put where an output goes, whose target is missing now (a disk not mounted), was
    silently replaced by a file, where a link to a file fails until ``--overwrite``."""
    (original,) = write_random_pngs(tmp_path / "in", n=1)
    link = original.with_name(f"{original.stem}.protected.png")
    link.symlink_to(tmp_path / "unmounted" / "img0.protected.png")
    before = original.read_bytes()
    (result,) = _run(_protector(), tmp_path / "in").values()
    assert result[0] == "failed" and "symbolic link to nowhere" in result[1] and "--overwrite" in result[1], result
    assert link.is_symlink() and original.read_bytes() == before
    (result,) = _run(_protector(), tmp_path / "in", overwrite=True).values()
    assert result[0] == "done", result
    assert not link.is_symlink() and link.is_file() and original.read_bytes() == before
