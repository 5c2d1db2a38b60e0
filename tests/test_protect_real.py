"""Fast Preemption with the real models of ../shared, end to end through the file pipeline.

The headline check of issue 2: protecting the 932 CIFAR-10 test images with backbone
``cifar10-resnet20-pgdat-a`` and classifier ``cifar10-resnet18-std`` must raise the clean accuracy of the
unseen victim ``cifar10-resnet20-pgdat-b`` by >= 4 points and its PGD-20 (8/255) accuracy by >= 15 points
(the thresholds of the issue; a reference run measured about +7 and +26). Nothing here is tuned to pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TEST_DEVICE
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs, load_model
from preempt_cli.attacks import PGD, robust_accuracy

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data" / "cifar10" / "test"
MODELS = SHARED / "models"
PHOTOS = SHARED / "data" / "photos"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not (CIFAR.is_dir() and MODELS.is_dir()), reason=f"{SHARED} (shared models/data) not found"),
]


def _load(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
                       ).float().div(255)  # fmt: skip


@pytest.mark.slow
def test_protecting_the_test_set_holds_the_budget_and_raises_the_victims_accuracy(tmp_path: Path) -> None:
    """One test, not one per property: protecting the 932 images takes most of its time, and a fixture they
    shared would be computed again by each worker of ``pytest -n`` that ran one of them."""
    torch.manual_seed(0)
    backbone = load_model("cifar10-resnet20-pgdat-a", models_dir=MODELS, device=TEST_DEVICE)
    classifier = load_model("cifar10-resnet18-std", models_dir=MODELS, device=TEST_DEVICE)
    items = sorted(collect_inputs([CIFAR]), key=lambda i: i.path.name)  # the first 932 test images, by index
    assert len(items) == 932
    protector = Protector(backbone, classifier, config=ForeBackConfig.from_preset("paper"), seed=0)
    by_input = {r.input: r for r in protector.run(items, RunOptions(out_dir=tmp_path))}
    results = [by_input[i.path] for i in items]
    assert [r.status for r in results].count("done") == 932, [r.reason for r in results if r.status != "done"][:3]
    images = {"original": _load([i.path for i in items]), "protected": _load([r.output for r in results])}

    # The budget: every pixel within 8 levels of its original, and a real perturbation, not a copy.
    diff = (images["protected"] - images["original"]).abs().mul(255).round()
    assert diff.max().item() <= 8
    assert diff.mean().item() > 1
    assert all(r.linf_levels <= 8 for r in results)
    # The backbone is more confident of the label after protection for almost every image.
    gains = [r.confidence_after - r.confidence_before for r in results]
    assert np.mean([g > 0 for g in gains]) > 0.9

    # What it buys an unseen victim, clean and under PGD-20.
    victim = load_model("cifar10-resnet20-pgdat-b", models_dir=MODELS, device=TEST_DEVICE)
    y = torch.tensor([backbone.config.classes.index(i.path.parent.name) for i in items])
    accs = {}
    for name in ("original", "protected"):
        attack = PGD(victim, norm="Linf", eps=8 / 255, steps=20, step_size=2 / 255, quantize=True, seed=0)
        accs[name] = robust_accuracy(victim, attack, images[name], y, batch_size=200)[:2]
    clean_gain = 100 * (accs["protected"][0] - accs["original"][0])
    robust_gain = 100 * (accs["protected"][1] - accs["original"][1])
    print(f"victim pgdat-b: clean {accs['original'][0]:.4f} -> {accs['protected'][0]:.4f} ({clean_gain:+.2f}), "
          f"PGD-20 {accs['original'][1]:.4f} -> {accs['protected'][1]:.4f} ({robust_gain:+.2f})")  # fmt: skip
    assert abs(accs["original"][0] - 0.8444) < 0.001  # the documented clean accuracy of the victim
    assert clean_gain >= 4
    assert robust_gain >= 15


@pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"{PHOTOS} not found")
def test_every_photo_round_trips(tmp_path: Path) -> None:
    backbone = load_model("cifar10-resnet20-pgdat-a", models_dir=MODELS, device=TEST_DEVICE)
    classifier = load_model("cifar10-resnet18-std", models_dir=MODELS, device=TEST_DEVICE)
    protector = Protector(backbone, classifier, config=ForeBackConfig.from_preset("paper", samples=2), seed=0)
    results = list(protector.run(collect_inputs([PHOTOS]), RunOptions(out_dir=tmp_path)))
    assert len(results) == len(list(PHOTOS.iterdir()))
    for r in results:
        assert r.status == "done", r.reason
        src, out = Image.open(r.input), Image.open(r.output)
        assert out.format == "PNG" and out.size == src.size
        assert out.mode == src.mode  # RGB, L and RGBA kept
        a, b = np.asarray(src, dtype=np.int64), np.asarray(out, dtype=np.int64)
        if src.mode in ("RGBA", "LA"):
            assert np.array_equal(a[..., -1], b[..., -1])  # alpha bit for bit
            a, b = a[..., :-1], b[..., :-1]
        assert 0 < np.abs(a - b).max() <= 8


def test_a_file_is_protected_alike_alone_and_among_others(tmp_path: Path) -> None:
    """A file's output does not depend on the other files of its run: its noise comes from the seed and its
    own pixels, and the backbone's batched passes compute each image on its own. Among other files at the
    same batch size that holds to the bit on every device. Across batch sizes it holds to the bit on a CPU
    (also measured with 300 files in batches of 256, 100 and 1); on CUDA another batch size may run other
    kernels, which round an image differently and can flip a gradient's sign near zero (an H100 kept
    97.9-100% of the values of these files at batches of 3 and 1: benchmarks/RESULTS.md). That is reported
    there, not bounded here."""
    backbone = load_model("cifar10-resnet20-pgdat-a", models_dir=MODELS, device=TEST_DEVICE)
    protector = Protector(backbone, labels="backbone", config=ForeBackConfig.from_preset("paper"), seed=0)
    cats = sorted(collect_inputs([CIFAR / "cat"]), key=lambda i: i.path.name)
    items, others = cats[:10], cats[10:15]
    pixels: dict[str, dict[str, np.ndarray]] = {}
    runs = (("10", 10, items), ("10, half of them others", 10, items[:5] + others), ("3", 3, items),
            ("alone", 1, items[4:5]))  # fmt: skip
    for name, batch_size, run_items in runs:
        results = list(protector.run(run_items, RunOptions(out_dir=tmp_path / name, batch_size=batch_size)))
        assert [r.status for r in results] == ["done"] * len(run_items)
        pixels[name] = {r.input.name: np.asarray(Image.open(r.output)) for r in results}
    shared = [i.path.name for i in items[:5]]  # at the same places of a batch of the same size
    assert all(np.array_equal(pixels["10, half of them others"][f], pixels["10"][f]) for f in shared)
    equal = [np.mean(pixels[name][f] == pixels["10"][f]) for name in ("3", "alone") for f in pixels[name]]
    assert len(equal) == 11
    if TEST_DEVICE.type == "cpu":
        assert min(equal) == 1.0, equal
