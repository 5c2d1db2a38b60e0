"""``preempt train`` / ``preempt keygen``: data loading, augmentation, training, checkpoints, registration.

Models here are CIFAR ResNet-20s on tiny synthetic images (16x16) whose class is a colour, so a few batches
suffice to show that training learns, and runs take about a second.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import CudaLikeDivision, make_tiny_model
from preempt_cli import train as train_module
from preempt_cli.cli import app
from preempt_cli.errors import ConfigError, ImageReadError, RegistryError
from preempt_cli.models import load_model
from preempt_cli.registry import get_model_config, load_registry, register_model
from preempt_cli.train import (
    KEYGEN_DEFAULTS,
    TrainConfig,
    _adversarial,
    arch_config,
    evaluate_accuracy,
    augment,
    checkpoint_path,
    keygen,
    load_train_data,
    train,
)

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _colour_images(root: Path, per_class: int = 24, size: int = 16, suffix: str = ".png") -> Path:
    """An ImageFolder of noisy single-colour images: the class is the colour."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}{suffix}")
    return root


def _zip_of(folder: Path, target: Path, top: str = "train") -> Path:
    with zipfile.ZipFile(target, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, f"{top}/{p.relative_to(folder).as_posix()}")
    return target


@pytest.fixture(scope="module")
def colour_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _colour_images(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def colour_data(colour_dir: Path):
    return load_train_data(colour_dir, input_hw=(16, 16))


def _one_batch_train(data: Path, out: Path) -> list[str]:
    """``preempt train`` arguments for one batch of one epoch, from scratch (the CLI tests' quick run)."""
    return ["train", str(data), "--arch", "cifar_resnet20", "--out", str(out), "--epochs", "1", "--max-batches",
            "1", "--batch-size", "8", "--holdout", "0", "--eval-images", "0", "--amp", "off", "--device", "cpu"]  # fmt: skip


def _small(**kw) -> TrainConfig:
    settings = dict(method="standard", epochs=2, batch_size=16, lr=0.05, holdout=12, eval_images=12,
                    eval_steps=2, amp="off")  # fmt: skip
    return TrainConfig(**(settings | kw))


def _arch(data) -> object:
    return arch_config("cifar_resnet20", classes=data.classes, input_size=(3, 16, 16), name="colour-net")


# -- data ---------------------------------------------------------------------------------------------------
def test_folder_and_zip_load_the_same_images(colour_dir: Path, tmp_path: Path, colour_data) -> None:
    zipped = load_train_data(_zip_of(colour_dir, tmp_path / "train.zip"), input_hw=(16, 16))
    assert colour_data.classes == zipped.classes == ("blue", "green", "red")
    assert torch.equal(colour_data.images, zipped.images) and torch.equal(colour_data.labels, zipped.labels)
    assert colour_data.images.dtype == torch.uint8 and colour_data.images.shape == (72, 3, 16, 16)
    # labels follow the folders: every "red" image is mostly red
    red = colour_data.images[colour_data.labels == colour_data.classes.index("red")].float()
    assert (red[:, 0].mean() > red[:, 1].mean() + 100).item()


def test_the_images_train_at_the_size_most_of_them_have(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A photo sorted first among 16x16 images set the size of every image, and the model's: it trained at
    the photo's size (60x the time on real data) and was registered so. Now the most common size wins, and
    the odd ones are said."""
    root = _colour_images(tmp_path / "set", per_class=4, size=16)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "blue" / "000-a-photo.png")  # first in file order
    with caplog.at_level("WARNING", logger="preempt_cli"):
        data = load_train_data(root)
    assert data.images.shape == (13, 3, 16, 16)
    assert "1 of 13 training images are not 16x16, the most common size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="preempt_cli"):
        assert load_train_data(root, input_hw=(8, 8)).images.shape == (13, 3, 8, 8)  # the size asked: nothing said
        assert load_train_data(_colour_images(tmp_path / "even", per_class=2)).images.shape[2:] == (16, 16)
    assert caplog.text == ""


def test_model_classes_fix_the_label_indices_and_unknown_folders_fail(colour_dir: Path) -> None:
    data = load_train_data(colour_dir, input_hw=(16, 16), classes=("red", "green", "blue", "gray"))
    assert data.classes == ("red", "green", "blue", "gray")
    assert set(data.labels.tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError, match="not classes of the model"):
        load_train_data(colour_dir, classes=("red", "green"))


def test_data_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_train_data(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        load_train_data(tmp_path / "empty")
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"not a png")
    # one class trained a model that answers it whatever the input ("1 classes")
    with pytest.raises(ConfigError, match=r"1 class folder \(cat\); training needs at least 2"):
        load_train_data(tmp_path / "bad")
    (tmp_path / "bad" / "dog").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "bad" / "dog" / "ok.png")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_train_data(tmp_path / "bad")
    # a member of a zip is named with the zip (it was named alone, as if it were a file)
    zipped = _zip_of(tmp_path / "bad", tmp_path / "bad.zip")
    with pytest.raises(ImageReadError) as err:
        load_train_data(zipped)
    assert str(err.value).startswith(f"{zipped}:train/cat/broken.png: "), str(err.value)


_INTERRUPTED_LOADS = """
import faulthandler, io, random, signal, sys, time, zipfile
from pathlib import Path
import numpy as np
from PIL import Image
from preempt_cli.train import load_train_data

data = Path(sys.argv[1])
png = io.BytesIO()
Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(png, "PNG")
with zipfile.ZipFile(data, "w") as z:
    for i in range(5000):
        z.writestr(f"{'ab'[i % 2]}/{i:05d}.png", png.getvalue())

def interrupt(signum, frame):  # what the CLI's handler of Ctrl-C, SIGTERM and SIGHUP does
    raise KeyboardInterrupt

signal.signal(signal.SIGALRM, interrupt)
start = time.perf_counter()
load_train_data(data, input_hw=(2, 2))
whole = time.perf_counter() - start
random.seed(0)
for trial in range(15):
    faulthandler.dump_traceback_later(20, exit=True)  # hung: every thread's stack, and exit 1
    signal.setitimer(signal.ITIMER_REAL, random.uniform(0.02, whole))
    try:
        load_train_data(data, input_hw=(2, 2))
        signal.setitimer(signal.ITIMER_REAL, 0)  # in the try: an alarm after a load that came back first
    except KeyboardInterrupt:
        pass
    faulthandler.cancel_dump_traceback_later()
print("every interrupted load came back")
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
def test_an_interrupt_while_the_images_decode_never_hangs(tmp_path: Path) -> None:
    # Ctrl-C or SIGTERM while `preempt train`/`keygen` decoded its data: the CLI raises KeyboardInterrupt in
    # the main thread wherever it is, and one that struck inside ThreadPoolExecutor.submit left the pool's
    # lock taken; its workers and the shutdown waited on each other for good. Before the fix this hung
    # within the first few interrupted loads (3 runs of 3); each load here takes about 0.4 s.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_LOADS, str(tmp_path / "d.zip")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "every interrupted load came back" in done.stdout, done.stderr[-3000:]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    # convert("RGB") clipped 0..65535 to 255: a 16-bit photo trained as nearly white
    levels = np.array([[0, 128, 129, 32896], [40000, 65407, 65408, 65535]], np.uint16)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(levels).save(tmp_path / cls / "g.png")
    assert Image.open(tmp_path / "a" / "g.png").mode.startswith("I")
    data = load_train_data(tmp_path)
    expected = np.round(levels / 257).astype(np.uint8)
    assert (data.images[0] == torch.from_numpy(expected)[None]).all(), data.images[0, 0]
    Image.fromarray(levels.astype(np.float32)).save(tmp_path / "b" / "f.tiff")  # no range to scale from
    with pytest.raises(ImageReadError, match="mode F"):
        load_train_data(tmp_path)


def test_held_out_split_is_fixed_and_disjoint(colour_data) -> None:
    train_a, held_a = colour_data.split(12)
    train_b, held_b = colour_data.split(12)
    assert torch.equal(held_a.images, held_b.images) and len(held_a) == 12 and len(train_a) == 60
    rows = {bytes(x.numpy().tobytes()) for x in held_a.images}
    assert not rows & {bytes(x.numpy().tobytes()) for x in train_a.images}


def test_augment_is_a_seeded_crop_and_flip() -> None:
    x = torch.rand(64, 3, 8, 8)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))
    # without padding only flips remain: each image is itself or its mirror
    f = augment(x, torch.Generator().manual_seed(0), pad=0)
    same = (f == x).flatten(1).all(1) | (f == x.flip(3)).flatten(1).all(1)
    assert same.all() and not torch.equal(f, x)
    # a crop of the zero-padded image: the centre 4x4 of an 8x8 image shifted by <= 2 stays inside
    c = augment(x, torch.Generator().manual_seed(1), pad=2, flip=False)
    found = [any(torch.equal(c[i, :, 2:6, 2:6], x[i, :, 2 + dy : 6 + dy, 2 + dx : 6 + dx])
                 for dy in range(-2, 3) for dx in range(-2, 3)) for i in range(64)]  # fmt: skip
    assert all(found)


def test_training_adversarial_examples_stay_in_budget(colour_data) -> None:
    model = load_model_free(colour_data)
    x = colour_data.images[:16].float() / 255
    y = colour_data.labels[:16]
    for method in ("fgsm-rs", "pgd"):
        cfg = TrainConfig(method=method, eps=8 / 255, attack_steps=3, amp="off")
        adv = _adversarial(model, x, y, cfg, torch.Generator().manual_seed(0), "off")
        assert (adv - x).abs().max() <= 8 / 255 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            clean_loss = torch.nn.functional.cross_entropy(model(x), y)
            adv_loss = torch.nn.functional.cross_entropy(model(adv), y)
        assert adv_loss > clean_loss


def load_model_free(data):
    from preempt_cli.models import build_model

    torch.manual_seed(0)
    return build_model(_arch(data)).train()


# -- training -------------------------------------------------------------------------------------------------
def test_training_learns_and_writes_loadable_safetensors(colour_data, tmp_path: Path) -> None:
    out = tmp_path / "net.safetensors"
    result = train(colour_data, out, config=_small(epochs=8), arch=_arch(colour_data))
    assert out.is_file() and not checkpoint_path(out).exists()
    assert [h.epoch for h in result.history] == list(range(1, 9))
    assert result.final.heldout_clean == 100.0  # colours are trivially separable once trained
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "cifar_resnet20" and meta["classes"] == "blue,green,red"
    assert "standard training, 8 epochs" in meta["training"] and meta["heldout_clean"] == "100.00"
    # the file loads through the registry like any other model and gives the same predictions
    reg = tmp_path / "models.toml"
    register_model("colour-net", {"arch": "cifar_resnet20", "input_size": [3, 16, 16], "mean": "none",
                                  "std": "none", "classes": list(colour_data.classes), "source": f"file:{out}",
                                  "sha256": result.sha256}, reg)  # fmt: skip
    model = load_model("colour-net", registry=[reg])
    x = colour_data.images.float() / 255
    with torch.no_grad():
        assert (model(x).argmax(1) == colour_data.labels).float().mean() == 1.0


def test_training_is_reproducible_and_seeded(colour_data, tmp_path: Path) -> None:
    cfg = _small(epochs=1, method="fgsm-rs", eval_images=0)
    a = train(colour_data, tmp_path / "a.safetensors", config=cfg, arch=_arch(colour_data))
    b = train(colour_data, tmp_path / "b.safetensors", config=cfg, arch=_arch(colour_data))
    c = train(colour_data, tmp_path / "c.safetensors", config=TrainConfig(**{**cfg.__dict__, "seed": 1}),
              arch=_arch(colour_data))  # fmt: skip
    wa, wb, wc = (load_file(str(r.output)) for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_each_epoch_reports_the_learning_rates_of_its_first_and_last_steps(colour_data, tmp_path: Path,
                                                                          monkeypatch) -> None:  # fmt: skip
    """An epoch's ``lr`` was the rate of its last step, though the schedule sets one at every step (one-cycle
    rises, then falls, within an epoch): read as the epoch's rate, it said the epoch trained at the rate it
    ended with. Each epoch now reports ``lr_first`` and ``lr_last``, the rates its first and last steps
    trained with (as the optimizer had them), and no ``lr``."""
    used: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        assert len({g["lr"] for g in self.param_groups}) == 1  # every group steps at the schedule's rate
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    cfg = _small(epochs=3, schedule="onecycle", holdout=0, eval_images=0)
    result = train(colour_data, tmp_path / "a.safetensors", config=cfg, arch=_arch(colour_data))
    per_epoch = len(colour_data.labels) // cfg.batch_size
    assert len(used) == 3 * per_epoch > 3
    for stats in result.history:
        steps = used[(stats.epoch - 1) * per_epoch : stats.epoch * per_epoch]
        assert (stats.lr_first, stats.lr_last) == (steps[0], steps[-1])
        assert stats.lr_first != stats.lr_last  # the schedule moves within each epoch
        assert "lr" not in asdict(stats)


class _Stop(Exception):
    """Stops a run from its ``on_epoch`` callback, once its first epoch's checkpoint is written."""


def _stop_after_first_epoch(stats) -> None:
    if stats.epoch == 1:
        raise _Stop


def test_a_checkpoint_with_the_old_per_epoch_lr_resumes_with_both_rates(colour_data, tmp_path: Path) -> None:
    """A checkpoint written before epochs reported ``lr_first`` and ``lr_last`` holds ``lr`` (the last step's) in
    its history: it resumes, its epochs reporting the rates an uninterrupted run reports."""
    from safetensors.torch import save_file

    cfg = _small(epochs=2, schedule="onecycle", holdout=0, eval_images=0)
    whole = train(colour_data, tmp_path / "whole.safetensors", config=cfg, arch=_arch(colour_data))
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(_Stop):
        train(colour_data, out, config=cfg, arch=_arch(colour_data), on_epoch=_stop_after_first_epoch)
    ckpt = checkpoint_path(out)
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(ckpt))
    history = json.loads(meta["history"])
    old = [{k: v for k, v in h.items() if k not in ("lr_first", "lr_last")} | {"lr": h["lr_last"]} for h in history]
    save_file(tensors, str(ckpt), metadata=meta | {"history": json.dumps(old)})
    resumed = train(colour_data, out, config=cfg, arch=_arch(colour_data), resume=True)
    rates = [(h.epoch, h.lr_first, h.lr_last) for h in resumed.history]
    assert rates == [(h.epoch, h.lr_first, h.lr_last) for h in whole.history]


def test_interrupted_run_resumes_to_the_same_weights(colour_data, tmp_path: Path) -> None:
    cfg = _small(epochs=3, eval_images=0)
    whole = train(colour_data, tmp_path / "whole.safetensors", config=cfg, arch=_arch(colour_data))

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(_Stop):
        train(colour_data, out, config=cfg, arch=_arch(colour_data), on_epoch=_stop_after_first_epoch)
    assert checkpoint_path(out).is_file() and not out.exists()
    epochs_run, epochs_started = [], []
    resumed = train(colour_data, out, config=cfg, arch=_arch(colour_data), resume=True,
                    on_epoch=lambda s: epochs_run.append(s.epoch), on_epoch_start=epochs_started.append)  # fmt: skip
    assert epochs_run == [2, 3] and [h.epoch for h in resumed.history] == [1, 2, 3]
    assert epochs_started == [2, 3]  # what a progress display names the epochs (it said 1, 2 after a resume)
    w1, w2 = load_file(str(whole.output)), load_file(str(out))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # a checkpoint of other settings is refused rather than silently mixed in
    with pytest.raises(_Stop):
        train(colour_data, out.with_name("x.safetensors"), config=cfg, arch=_arch(colour_data),
              on_epoch=_stop_after_first_epoch)  # fmt: skip
    with pytest.raises(ConfigError, match=r"other settings \(epochs 3 there, 4 here\)"):  # which ones, named
        train(colour_data, out.with_name("x.safetensors"), config=_small(epochs=4, eval_images=0),
              arch=_arch(colour_data), resume=True)  # fmt: skip
    # and so is one made on other images, even as many of them
    other = type(colour_data)(colour_data.source, colour_data.images.flip(0), colour_data.labels.flip(0),
                              colour_data.classes)  # fmt: skip
    with pytest.raises(ConfigError, match=r"other settings \(the training images\)"):
        train(other, out.with_name("x.safetensors"), config=cfg, arch=_arch(colour_data), resume=True)


def _dropout_net(num_classes: int = 10) -> torch.nn.Module:
    """A tiny net with dropout, as timm's rexnet_100 and ghostnet_100 have by default."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(8, num_classes))  # fmt: skip


def test_dropout_draws_from_the_runs_seed_and_resumes_to_the_same_weights(colour_data, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # dropout draws from torch's global generator, which the run neither seeded nor checkpointed: the same
    # --seed gave other weights from run to run (following whatever the caller drew before), a resumed run
    # other weights than an uninterrupted one, and the run advanced the caller's generator
    from preempt_cli.models import _registry

    monkeypatch.setitem(_registry._arch_entrypoints, "dropout_net", _dropout_net)
    arch = arch_config("dropout_net", classes=colour_data.classes, input_size=(3, 16, 16), name="dropout-net")
    cfg = _small(epochs=2, eval_images=0)
    torch.manual_seed(1)
    a = train(colour_data, tmp_path / "a.safetensors", config=cfg, arch=arch)
    torch.manual_seed(2)
    callers = torch.get_rng_state()
    b = train(colour_data, tmp_path / "b.safetensors", config=cfg, arch=arch)
    assert torch.equal(torch.get_rng_state(), callers)  # the caller's generator is left where it was
    wa, wb = load_file(str(a.output)), load_file(str(b.output))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(_Stop):
        train(colour_data, out, config=cfg, arch=arch, on_epoch=_stop_after_first_epoch)
    torch.manual_seed(3)  # another process, whose generator is elsewhere
    train(colour_data, out, config=cfg, arch=arch, resume=True)
    wr = load_file(str(out))
    assert all(torch.equal(wa[k], wr[k]) for k in wa)


def test_a_damaged_checkpoint_is_named_with_what_to_do(colour_data, tmp_path: Path) -> None:
    # a resume said "internal error: SafetensorError ..." or "internal error: KeyError: 'rng'", naming no file
    from preempt_cli.hub import save_safetensors

    cfg = _small(epochs=2, eval_images=0, max_batches_per_epoch=1)
    out = tmp_path / "x.safetensors"

    with pytest.raises(_Stop):
        train(colour_data, out, config=cfg, arch=_arch(colour_data), on_epoch=_stop_after_first_epoch)
    ckpt = checkpoint_path(out)
    whole = ckpt.read_bytes()
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys() if k != "rng"}  # not views of the file
    damaged = {"truncated": lambda: ckpt.write_bytes(whole[: len(whole) // 2]),
               "no rng": lambda: save_safetensors(tensors, ckpt, meta)}  # fmt: skip
    for name, damage in damaged.items():
        damage()
        with pytest.raises(ConfigError) as err:
            train(colour_data, out, config=cfg, arch=_arch(colour_data), resume=True)
        message = str(err.value)
        assert message.startswith(f"{ckpt}: damaged checkpoint (") and "--overwrite" in message, (name, message)
        assert "\n" not in message and not out.exists()


def test_bad_settings_are_refused(colour_data, tmp_path: Path) -> None:
    for bad in (dict(method="trades"), dict(schedule="step"), dict(epochs=0), dict(amp="fp8"), dict(eps=2.0)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(colour_data, tmp_path / "x.safetensors", config=_small(batch_size=500), arch=_arch(colour_data))


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(lr=float("inf")), dict(weight_decay=float("nan")),
                                 dict(weight_decay=-1.0), dict(step_size=float("nan"))])
def test_non_finite_settings_are_refused(bad) -> None:
    # NaN passed "lr <= 0" and trained NaN weights, which were written and registered
    with pytest.raises(ConfigError, match="must be"):
        TrainConfig(**bad)


def test_weights_made_non_finite_by_the_last_step_are_not_written(colour_data, tmp_path: Path) -> None:
    # the loss is finite before the one step, which takes the final layer past float32's range: the
    # divergence check on the loss did not see it, and inf weights were written
    out = tmp_path / "x.safetensors"
    cfg = _small(epochs=1, lr=3e38, schedule="cosine", max_batches_per_epoch=1, holdout=0, eval_images=0)
    with pytest.raises(ConfigError, match="training diverged at epoch 1: .* not finite .*not written"):
        train(colour_data, out, config=cfg, arch=_arch(colour_data))
    assert not out.exists() and not checkpoint_path(out).exists()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules_rise_and_fall_to_zero(schedule: str) -> None:
    cfg = TrainConfig(schedule=schedule, lr=0.1)
    lrs = [cfg.learning_rate(p / 100) for p in range(101)]
    assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert (lrs[0] == 0.0) == (schedule == "onecycle")


# -- keygen ---------------------------------------------------------------------------------------------------
def _colour_base(colour_data, tmp_path: Path, epochs: int) -> tuple[Path, Path]:
    """A base model trained on the colours and registered as ``colour-base``: (its weights, the registry)."""
    base_out = tmp_path / "base.safetensors"
    base = train(colour_data, base_out, config=_small(epochs=epochs), arch=_arch(colour_data))
    reg = tmp_path / "models.toml"
    register_model("colour-base", {"arch": "cifar_resnet20", "input_size": [3, 16, 16], "mean": "none",
                                   "std": "none", "classes": list(colour_data.classes),
                                   "source": f"file:{base_out}", "sha256": base.sha256}, reg)  # fmt: skip
    return base_out, reg


def test_a_model_fine_tuned_from_a_private_key_is_written_private_too(colour_data, tmp_path: Path) -> None:
    # train --base KEY wrote the model derived from the key, and its checkpoints, readable by every user
    # (0644), though the key itself is kept readable by its owner alone
    base_out, reg = _colour_base(colour_data, tmp_path, epochs=1)
    old = os.umask(0o022)
    try:
        public = train(colour_data, tmp_path / "public.safetensors", config=_small(epochs=1), base="colour-base",
                       registry=[reg], keep_checkpoint=True)  # fmt: skip
        assert stat.S_IMODE(public.output.stat().st_mode) == 0o644  # a shared base: a model to share
        os.chmod(base_out, 0o600)  # as keygen writes a key
        derived = train(colour_data, tmp_path / "derived.safetensors", config=_small(epochs=1),
                        base="colour-base", registry=[reg], keep_checkpoint=True)  # fmt: skip
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE(derived.output.stat().st_mode)) == oct(0o600)
    assert oct(stat.S_IMODE(checkpoint_path(derived.output).stat().st_mode)) == oct(0o600)


def _keygen_config(**kw) -> TrainConfig:
    small = dict(batch_size=16, holdout=12, eval_images=12, eval_steps=2, amp="off")
    return TrainConfig(**{**KEYGEN_DEFAULTS.__dict__, **small, **kw})


def test_keygen_derives_distinct_keys_and_never_stores_the_seed(colour_data, tmp_path: Path) -> None:
    base_out, reg = _colour_base(colour_data, tmp_path, epochs=2)
    cfg = _keygen_config()
    k1 = keygen("colour-base", colour_data, tmp_path / "k1.safetensors", seed=123456789, config=cfg, registry=[reg])
    k2 = keygen("colour-base", colour_data, tmp_path / "k2.safetensors", seed=987654321, config=cfg, registry=[reg])
    k1b = keygen("colour-base", colour_data, tmp_path / "k1b.safetensors", seed=123456789, config=cfg, registry=[reg])
    w0, w1, w2, w1b = (load_file(str(p)) for p in (base_out, k1.output, k2.output, k1b.output))
    assert all(torch.equal(w1[k], w1b[k]) for k in w1)  # the seed determines the key
    assert not torch.equal(w1["fc.weight"], w2["fc.weight"]) and not torch.equal(w1["fc.weight"], w0["fc.weight"])
    assert not torch.equal(w1["conv1.weight"], w0["conv1.weight"])  # the whole net moved, not just the head
    for r in (k1, k2):
        raw = r.output.read_bytes()
        assert b"123456789" not in raw and b"987654321" not in raw
        assert "secret seed (not stored)" in r.metadata["training"]
        assert not checkpoint_path(r.output).exists()
    assert k1.config.seed == 123456789  # the caller's own seed is theirs to see


def test_keygen_returns_no_secret_seed(colour_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the result's config held the seed drawn from the OS (its repr printed it): the CLI, weights and
    # registry never hold it, so neither may the API's result
    import preempt_cli.train as train_module

    _, reg = _colour_base(colour_data, tmp_path, epochs=1)
    monkeypatch.setattr(train_module, "new_secret_seed", lambda: 5555555555555)
    key = keygen("colour-base", colour_data, tmp_path / "k.safetensors", config=_keygen_config(max_batches_per_epoch=1),
                 registry=[reg])  # fmt: skip
    assert key.config.seed is None and "5555555555555" not in repr(key)


def test_keygen_never_seeds_torchs_global_cuda_generators(colour_data, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # torch.manual_seed(seed) for the initialization seeded every CUDA device's global generator too, and the
    # fork around it gave back the CPU's alone: on a GPU machine torch.cuda.initial_seed() then returned the
    # secret seed to anyone in the process, and the caller's own CUDA random state was reset
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    _, reg = _colour_base(colour_data, tmp_path, epochs=1)
    keygen("colour-base", colour_data, tmp_path / "k.safetensors", seed=24681357, registry=[reg],
           config=_keygen_config(max_batches_per_epoch=1))  # fmt: skip
    assert seeded == []


# -- registry -------------------------------------------------------------------------------------------------
def test_register_model_adds_replaces_and_keeps_other_rows(tmp_path: Path) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text('# my models\n[models.keep]\narch = "cifar_resnet20"\nsource = "file:keep.safetensors"\n')
    row = {"arch": "cifar_resnet20", "arch_args": {"shortcut": "pad_end"}, "source": "file:a.safetensors",
           "description": 'has "quotes" and \\ backslash'}  # fmt: skip
    register_model("mine", row, reg)
    with pytest.raises(RegistryError, match="already registered"):
        register_model("mine", row, reg)
    register_model("mine", {**row, "source": "file:b.safetensors"}, reg, overwrite=True)
    text = reg.read_text()
    assert text.startswith("# my models") and text.count("[models.mine]") == 1
    models = load_registry([reg])
    assert models["mine"].source.location == "b.safetensors" and models["keep"].arch == "cifar_resnet20"
    assert models["mine"].description == 'has "quotes" and \\ backslash'
    assert models["mine"].arch_args == {"shortcut": "pad_end"}
    with pytest.raises(RegistryError, match="invalid model name"):
        register_model("bad name", row, reg)
    with pytest.raises(RegistryError, match="missing field"):
        register_model("nosource", {"arch": "cifar_resnet20"}, reg)
    assert "nosource" not in reg.read_text()


# -- CLI ------------------------------------------------------------------------------------------------------
def test_cli_train_registers_a_backbone_that_protect_uses(colour_dir: Path, tmp_path: Path, isolated_config: Path) -> None:
    runner = CliRunner()
    data = _zip_of(colour_dir, tmp_path / "colours.zip")
    out = tmp_path / "my-key.safetensors"
    args = ["train", str(data), "--arch", "cifar_resnet20", "--out", str(out), "--epochs", "1", "--batch-size", "16",
            "--holdout", "12", "--eval-images", "8", "--amp", "off", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["event"] == "epoch" and lines[-1]["event"] == "done" and lines[-1]["name"] == "my-key"
    # the rates of the epoch's first and last steps, named so (its "lr" was the last step's alone)
    assert lines[0]["lr_first"] != lines[0]["lr_last"] and "lr" not in lines[0]
    # the help says what --json prints (it said the other commands' "one JSON object per result")
    [json_help] = [p.help for p in typer.main.get_command(app).commands["train"].params if "--json" in p.opts]
    assert sorted(e for e in {line["event"] for line in lines} if f'"event": "{e}"' not in json_help) == []
    cfg = get_model_config("my-key")
    assert cfg.role == "backbone" and cfg.input_size == (3, 16, 16) and cfg.classes == ("blue", "green", "red")
    # usable at once as a backbone
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(photos / "a.png")
    result = runner.invoke(app, ["protect", str(photos), "--backbone", "my-key", "--labels", "backbone", "-q"])
    assert result.exit_code == 0, result.output
    assert (photos / "a.protected.png").is_file()
    # an existing output is not overwritten without --force; a name clash in the registry neither
    assert runner.invoke(app, args).exit_code == 2
    result = runner.invoke(app, args[:-1] + ["--force", "-q"])
    assert result.exit_code == 0, result.output


def test_cli_no_register_over_a_registered_file_warns_of_its_pin(colour_dir: Path, tmp_path: Path,
                                                                  isolated_config: Path) -> None:  # fmt: skip
    # --force --no-register replaced a registered file silently: protect then called it corrupt
    out = tmp_path / "pinned.safetensors"
    args = _one_batch_train(colour_dir, out)
    assert CliRunner().invoke(app, [*args, "-q"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--seed", "1", "--force", "--no-register"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "pins the old sha256" in line]
    assert warning == [f"warning: the registered model 'pinned' pins the old sha256 of {out}, which the new file "
                       "does not match (loading it fails as corrupt); drop --no-register to update it"], result.stderr
    # the same weights again: the pin matches, nothing to say
    assert CliRunner().invoke(app, [*args, "--force", "-q"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--force", "--no-register"])
    assert result.exit_code == 0 and "pins the old sha256" not in result.stderr
    # registered under another name: the row of the file's former weights was left stale without a word
    result = CliRunner().invoke(app, [*args, "--seed", "2", "--force", "--name", "renamed"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if "pins the old sha256" in line]
    assert warning == [f"warning: the registered model 'pinned' pins the old sha256 of {out}, which the new file "
                       "does not match (loading it fails as corrupt); the new file is registered as 'renamed': "
                       "remove the row of 'pinned', or register under its name to update it"], result.stderr


def test_training_description_names_shortened_epochs() -> None:
    # the weights' and registry's "training" said "5 epochs" of a run cut to one batch each by --max-batches
    assert ", 5 epochs of at most 1 batch, " in _small(epochs=5, max_batches_per_epoch=1).describe()
    assert ", 5 epochs, " in _small(epochs=5).describe()


def test_cli_keygen_on_too_few_images_says_what_to_change(colour_dir: Path, tmp_path: Path, isolated_config: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # it said "fewer than one batch of 128", though keygen has no --batch-size
    import preempt_cli.cli._train as cli_train

    monkeypatch.setattr(cli_train, "get_model_config", lambda name, reg: arch_config(
        "cifar_resnet20", classes=("blue", "green", "red"), input_size=(3, 16, 16)))  # fmt: skip
    result = CliRunner().invoke(app, ["keygen", "--base", "colour-base", "--data", str(colour_dir), "--out",
                                      str(tmp_path / "k.safetensors"), "--holdout", "12", "--no-register"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert (f"{colour_dir}: keygen trains in batches of 128, and 60 images (12 held out) are fewer: give more data "
            "or lower --holdout") in result.stderr, result.stderr  # fmt: skip


def test_cli_train_counts_the_images_it_trains_on(colour_dir: Path, tmp_path: Path, isolated_config: Path) -> None:
    # 72 images, 12 of them held out: it trains on 60 (it said 72)
    args = ["train", str(colour_dir), "--arch", "cifar_resnet20", "--out", str(tmp_path / "n.safetensors"),
            "--epochs", "1", "--max-batches", "1", "--batch-size", "8", "--holdout", "12", "--eval-images", "0",
            "--amp", "off", "--no-register", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # and with --max-batches, says that each epoch trains on fewer (it said 60 and trained on 8)
    assert "training on 60 images (12 held out; 3 classes; at most 1 batch of 8 per epoch) from " in result.stderr, \
        result.stderr
    # a holdout of every image is refused before that line (it would say 0)
    result = CliRunner().invoke(app, [*args, "--holdout", "72", "--force"])
    assert result.exit_code == 2 and "--holdout 72 leaves no training images" in result.stderr
    assert "training on" not in result.stderr


def test_training_images_line(colour_data) -> None:
    from preempt_cli.cli._train import _training_images

    assert colour_data.training_size(12) == len(colour_data) - 12
    assert _training_images(colour_data, 0) == f"{len(colour_data):,} images"
    assert _training_images(colour_data, 12, "3 classes") == f"{len(colour_data) - 12:,} images (12 held out; 3 classes)"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one of --base"),
        (["--arch", "cifar_resnet20", "--base", "x"], "exactly one of --base"),
        (["--arch", "cifar_resnet20", "--method", "trades"], "unknown training method"),
        (["--arch", "cifar_resnet20", "--out", "x.pt"], "must be a .safetensors"),
        # values that once silently became the defaults (--epochs 0 trained 15 epochs)
        (["--arch", "cifar_resnet20", "--epochs", "0"], "epochs must be >= 1"),
        (["--arch", "cifar_resnet20", "--lr", "0"], "lr must be a positive number"),
        # NaN passed the check "lr <= 0": it trained, wrote and registered NaN weights
        (["--arch", "cifar_resnet20", "--lr", "nan"], "lr must be a positive number, got nan"),
        (["--arch", "cifar_resnet20", "--weight-decay", "nan"], "weight-decay must be a number >= 0"),
        (["--arch", "cifar_resnet20", "--weight-decay", "-1"], "weight-decay must be a number >= 0"),
        (["--arch", "cifar_resnet20", "--input-size", "0"], "--input-size must be >= 1"),
        # it named an option that does not exist (--max-batches-per-epoch)
        (["--arch", "cifar_resnet20", "--max-batches", "0"], "max-batches must be >= 1, got 0"),
        # refused only at registration, once the weights were written (a re-run then said they exist)
        (["--arch", "cifar_resnet20", "--role", "foo"], "--role must be one of backbone, classifier, victim, any"),
        # options of a from-scratch model, which a --base ignored without a word
        (["--base", "cifar10-resnet20-pgdat-a", "--input-size", "32"], "--input-size: only with --arch"),
        (["--base", "cifar10-resnet20-pgdat-a", "--arch-arg", "shortcut=pad_end"], "--arch-arg: only with --arch"),
        # a number no registry row can hold (its TOML is read back with finite floats only)
        (["--arch", "cifar_resnet20", "--arch-arg", "drop_rate=nan"], "--arch-arg drop_rate: nan is not a finite"),
    ],
)
def test_cli_train_usage_errors(extra: list[str], message: str, colour_dir: Path, tmp_path: Path,
                                isolated_config: Path) -> None:  # fmt: skip
    args = ["train", str(colour_dir), "--out", str(tmp_path / "o.safetensors"), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o.safetensors").exists() and "training on" not in result.output


@pytest.mark.parametrize(
    "item, value",
    [
        ("depth=20", 20), ("offset=-3", -3), ("width=08", 8),  # whole numbers as before
        # a float reached timm as the text "0.1" (nn.Dropout(p="0.1") then fails), and true as the text "true"
        ("drop_rate=0.1", 0.1), ("drop_rate=1e-3", 1e-3), ("pre_act=true", True), ("pre_act=false", False),
        ("channels=[16, 32]", [16, 32]), ('name="a b"', "a b"),
        ("shortcut=pad_end", "pad_end"), ("act=relu", "relu"), ("day=2020-01-01", "2020-01-01"),  # words as text
        ("days=[2020-01-01]", "[2020-01-01]"),
    ],
)
def test_cli_train_arch_arg_values_are_typed_as_a_registry_row_types_them(item: str, value: object) -> None:
    """``--arch-arg KEY=VALUE`` gives the architecture what the same value in a registry row's ``arch_args``
    would (TOML's integers, floats, booleans, strings and arrays); other text is passed as it is."""
    from preempt_cli.cli._train import _arch_args

    key = item.partition("=")[0]
    parsed = _arch_args([item])[key]
    assert parsed == value and type(parsed) is type(value)


def test_cli_keygen_help_mentions_the_secret() -> None:
    result = CliRunner().invoke(app, ["keygen", "--help"])
    assert result.exit_code == 0 and "secret" in result.output
    # the example after it replaces what an earlier run with the default key wrote (else it fails on it)
    wide = CliRunner().invoke(app, ["keygen", "--help"], env={"COLUMNS": "400"})
    assert "preempt protect ./photos --backbone my-key --overwrite" in wide.output
    # a seed typed on the command line is readable by every user in the process list while keygen runs, and
    # kept in the shell's history: the option that takes one says so
    assert "process list" in wide.output and "shell history" in wide.output, wide.output


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        (["train"], ["(default: 15 from scratch, 5 with --base)", "(default: 0.2 from scratch, 0.05 with --base)"]),
        (["keygen"], ["Passes over the training data (default: 1)", "Peak learning rate (default: 0.02)"]),
        (["eval"], ["Images per defense batch (default: 256 on a CUDA GPU, else 50)"]),
    ],
)
def test_cli_help_gives_the_defaults(command: list[str], defaults: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.stdout.replace("│", " ").split())
    assert result.exit_code == 0 and all(d in text for d in defaults), text


def test_cli_progress_names_the_epoch_a_resume_starts_at(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from preempt_cli.cli import _common
    from preempt_cli.cli._train import _reporter

    monkeypatch.setattr(_common, "stderr", Console(file=io.StringIO(), force_terminal=True))  # a bar is drawn
    progress, callbacks = _reporter(json_out=False, quiet=False)
    callbacks["on_epoch_start"](3)  # a run resumed after epoch 2
    callbacks["on_batch"](1, 5)
    assert [t.description for t in progress.tasks] == ["epoch 3"]


def test_cli_resume_never_retrains_a_finished_model(colour_dir: Path, tmp_path: Path, isolated_config: Path) -> None:
    out = tmp_path / "done.safetensors"
    out.write_bytes(b"a finished model")  # no checkpoint beside it: nothing to resume
    args = ["train", str(colour_dir), "--arch", "cifar_resnet20", "--out", str(out), "--resume", "--no-register"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "is finished" in result.output and "--overwrite" in result.output
    assert out.read_bytes() == b"a finished model"


def test_cli_resume_without_a_checkpoint_says_it_starts_over(colour_dir: Path, tmp_path: Path,
                                                             isolated_config: Path) -> None:  # fmt: skip
    # --resume where no checkpoint is (a typo in --out, a relative --out from another folder) trained from
    # epoch 1 without a word, and finished as if it had continued
    out = tmp_path / "net.safetensors"
    args = [*_one_batch_train(colour_dir, out), "--no-register", "--resume"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"--resume: no checkpoint at {checkpoint_path(out)} (nothing to continue): training starts at " \
           "epoch 1" in result.stderr, result.stderr  # fmt: skip
    assert out.is_file()


def test_cli_a_checkpoint_is_resumed_or_overwritten_only_when_asked(colour_dir: Path, tmp_path: Path,
                                                                   isolated_config: Path) -> None:  # fmt: skip
    # a re-run without --resume started over at epoch 1, overwrote the checkpoint and deleted it, silently
    out = tmp_path / "net.safetensors"
    checkpoint_path(out).write_bytes(b"an interrupted run's checkpoint")
    args = [*_one_batch_train(colour_dir, out), "--no-register", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"a checkpoint of an interrupted run is at {checkpoint_path(out)}: --resume continues it, " \
           "--overwrite starts over" in result.stderr  # fmt: skip
    assert checkpoint_path(out).read_bytes() == b"an interrupted run's checkpoint" and not out.exists()
    result = CliRunner().invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not checkpoint_path(out).exists()


@pytest.mark.parametrize(("command", "says"), [
    ("train", "interrupted: run the same command with --resume to continue after the last finished epoch"),
    ("keygen", "interrupted: keygen keeps no checkpoint (it would hold the secret seed's state): a re-run starts over"),
])  # fmt: skip
def test_cli_interrupt_says_what_a_re_run_does(command: str, says: str, colour_dir: Path, tmp_path: Path,
                                               isolated_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # both said "run again to do the rest", and a plain re-run of train started over
    import preempt_cli.cli._train as cli_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "load_train_data", interrupted)  # Ctrl-C while reading the data
    out = str(tmp_path / "o.safetensors")
    common = ["--holdout", "0", "--eval-images", "0", "--no-register", "--device", "cpu"]
    if command == "train":
        args = ["train", str(colour_dir), "--arch", "cifar_resnet20", "--out", out, *common]
    else:
        args = ["keygen", "--base", "cifar10-resnet20-pgdat-a", "--data", str(colour_dir), "--out", out, *common]
        monkeypatch.setattr(cli_train, "get_model_config", lambda name, reg: arch_config(
            "cifar_resnet20", classes=("blue", "green", "red"), input_size=(3, 16, 16)))  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and says in result.stderr, result.output


@pytest.mark.parametrize(("out", "message"), [
    ("folder.safetensors", "folder.safetensors is a folder: name the .safetensors file to write"),
    ("file/x.safetensors", "file is a file, not a folder"),
    ("file/sub/x.safetensors", "file is a file, not a folder"),
    ("locked/x.safetensors", "no file can be created in"),
])  # fmt: skip
@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_an_unwritable_output_fails_before_training(command: str, out: str, message: str, colour_dir: Path,
                                                         tmp_path: Path, isolated_config: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # each failed after the whole training, with exit 1 ("cannot write: File exists" under a file)
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "locked").mkdir(mode=0o500)
    if out.startswith("locked") and os.access(tmp_path / "locked", os.W_OK):  # root writes in it anyway
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("preempt_cli.cli._train.tempfile.mkstemp", denied)
    target = str(tmp_path / out)
    if command == "train":
        args = ["train", str(colour_dir), "--arch", "cifar_resnet20", "--out", target, "--force"]
    else:
        args = ["keygen", "--base", "no-such-model", "--data", str(colour_dir), "--out", target, "--force"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "training on" not in result.stderr


@pytest.mark.parametrize("blocked", ["file", "unwritable"])
@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_a_registry_that_cannot_be_written_fails_before_training(command: str, blocked: str, colour_dir: Path,
                                                                   tmp_path: Path, isolated_config: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # XDG_CONFIG_HOME naming a file: the weights were written, then "internal error: NotADirectoryError"
    # (exit 2), and a re-run said that they exist
    import tempfile

    if blocked == "file":
        (tmp_path / "afile").write_bytes(b"")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "afile"))
        registry, reason = tmp_path / "afile" / "preempt" / "models.toml", f"{tmp_path / 'afile'} is a file, not a folder"
    else:
        config = isolated_config / "preempt"
        config.mkdir()
        registry, reason = config / "models.toml", f"no file can be created in {config} (Permission denied)"
        real = tempfile.mkstemp

        def denied(*args, **kwargs):  # root writes anywhere: refuse the config folder alone
            if Path(kwargs.get("dir", "")) == config:
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "k.safetensors"
    small = ["--epochs", "1", "--max-batches", "1", "--holdout", "0", "--eval-images", "0", "--amp", "off",
             "--device", "cpu", "-q"]  # fmt: skip
    if command == "train":
        args = ["train", str(colour_dir), "--arch", "cifar_resnet20", "--batch-size", "8", *small]
    else:
        args = ["keygen", "--base", "no-such-model", "--data", str(colour_dir), *small]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: {registry}: cannot be written: {reason}; "
                             "name a registry you can write with PREEMPT_REGISTRY, or pass --no-register\n"), result.stderr
    assert not out.exists() and not checkpoint_path(out).exists()
    # --no-register trains, as the message says
    if command == "train":
        result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-register"])
        assert result.exit_code == 0 and out.is_file(), result.output


def test_cli_a_row_the_registry_refuses_fails_before_training(colour_dir: Path, tmp_path: Path, isolated_config: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import preempt_cli.cli._train as cli_train

    real = cli_train._registry_row
    monkeypatch.setattr(cli_train, "_registry_row", lambda *a: real(*a) | {"num_classes": 0})  # any invalid row
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(app, ["train", str(colour_dir), "--arch", "cifar_resnet20", "--out", str(out)])
    assert result.exit_code == 2 and "cannot register the result as 'x': model 'x': num_classes must be" in result.stderr
    assert "training on" not in result.stderr and not out.exists()
    assert not (isolated_config / "preempt" / "models.toml").exists()


def test_cli_output_folders_are_made_when_missing(colour_dir: Path, tmp_path: Path, isolated_config: Path) -> None:
    out = tmp_path / "new" / "sub" / "x.safetensors"
    args = [*_one_batch_train(colour_dir, out), "--no-register", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and out.is_file(), result.output
    assert [p.name for p in out.parent.iterdir()] == ["x.safetensors"]  # no probe left behind


def test_keygen_leaves_no_checkpoint_even_when_interrupted(colour_data, tmp_path: Path) -> None:
    # a checkpoint holds the secret-seeded generator's state: an interrupted keygen must not leave one
    _, reg = _colour_base(colour_data, tmp_path, epochs=1)
    cfg = _keygen_config(epochs=2)

    def interrupt(stats) -> None:
        raise KeyboardInterrupt

    key = tmp_path / "key.safetensors"
    with pytest.raises(KeyboardInterrupt):
        keygen("colour-base", colour_data, key, seed=123456789, config=cfg, registry=[reg], on_epoch=interrupt)
    assert not key.exists() and not checkpoint_path(key).exists()
    assert not [p for p in tmp_path.iterdir() if "key" in p.name]


def test_zips_of_several_trees_are_refused_and_macos_extras_ignored(colour_dir: Path, tmp_path: Path,
                                                                    colour_data) -> None:  # fmt: skip
    both = tmp_path / "both.zip"
    with zipfile.ZipFile(both, "w") as z:  # train/ and test/ in one zip: merged, the test set would be trained on
        for top in ("train", "test"):
            for p in sorted(colour_dir.rglob("*.png")):
                z.write(p, f"{top}/{p.relative_to(colour_dir).as_posix()}")
    with pytest.raises(ConfigError, match="several top folders"):
        load_train_data(both, input_hw=(16, 16))
    mac = _zip_of(colour_dir, tmp_path / "mac.zip")
    with zipfile.ZipFile(mac, "a") as z:  # what macOS's archiver adds
        z.writestr("__MACOSX/train/red/._000.png", b"resource fork")
        z.writestr("train/red/._000.png", b"resource fork")
    loaded = load_train_data(mac, input_hw=(16, 16))
    assert torch.equal(loaded.images, colour_data.images) and torch.equal(loaded.labels, colour_data.labels)


def test_hidden_folders_and_files_are_not_classes_or_images(colour_dir: Path, tmp_path: Path, colour_data) -> None:
    # .ipynb_checkpoints/ became a fourth class of an --arch model (protect skips hidden entries)
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(colour_dir, folder)
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(folder / "red" / "000.png", folder / ".ipynb_checkpoints" / "000-checkpoint.png")
    shutil.copy(folder / "red" / "000.png", folder / "red" / ".hidden.png")
    zipped = _zip_of(folder, tmp_path / "data.zip")
    for source in (folder, zipped):
        loaded = load_train_data(source, input_hw=(16, 16))
        assert loaded.classes == colour_data.classes and torch.equal(loaded.images, colour_data.images), source


@pytest.mark.parametrize("settings", [dict(eps=1), dict(eps=8), dict(step_size=2)])
def test_train_config_refuses_an_int_budget(settings) -> None:
    """``TrainConfig(eps=1)`` trained against the whole [0, 1] range, then failed in the epoch's PGD check."""
    with pytest.raises(ConfigError, match="is an int"):
        TrainConfig(method="pgd", **settings)
    TrainConfig(method="standard", eps=0)  # no budget at all is unambiguous


def test_the_images_measured_each_epoch_are_of_every_class(tmp_path: Path) -> None:
    """The held-out split was sorted by index, so the first --eval-images of it, the ones measured, were of
    the first classes only (500 of 1000 held out of CIFAR-10: none of frog, horse, ship, truck)."""
    from preempt_cli.train import TrainData

    labels = torch.arange(10).repeat_interleave(100)  # loaded in class order, as folders are
    data = TrainData(tmp_path, torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), labels, tuple(f"c{i}" for i in range(10)))
    _, held = data.split(200)
    assert torch.equal(held.labels, data.split(200)[1].labels)  # a fixed split ...
    assert set(held.labels[:50].tolist()) == set(range(10))  # ... whose first images are of every class


def test_one_class_is_refused_with_a_base_model_too(tmp_path: Path, colour_dir: Path) -> None:
    """With a base model (train --base, keygen) the classes are the model's: a folder of one of them
    trained, reported 100%, and registered a key that answers that class whatever the input."""
    only = tmp_path / "only" / "red"
    only.mkdir(parents=True)
    for p in sorted((colour_dir / "red").iterdir())[:4]:
        (only / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ConfigError, match=r"1 class folder \(red\); training needs at least 2"):
        load_train_data(tmp_path / "only", classes=("blue", "green", "red"))


def test_cli_an_image_training_cannot_decode_is_a_usage_error(colour_dir: Path, tmp_path: Path,
                                                               isolated_config: Path) -> None:  # fmt: skip
    """Nothing is trained: exit 2 (exit 1 says some inputs failed and the rest were done), in one line
    without Pillow's name for an in-memory buffer."""
    data = tmp_path / "data"
    for cls in ("red", "blue"):
        (data / cls).mkdir(parents=True)
        for p in sorted((colour_dir / cls).iterdir())[:8]:
            (data / cls / p.name).write_bytes(p.read_bytes())
    (data / "red" / "zz_bad.png").write_bytes(b"not an image at all")
    result = CliRunner().invoke(app, ["train", str(data), "--arch", "cifar_resnet20", "--out",
                                      str(tmp_path / "k.safetensors"), "--epochs", "1", "--holdout", "0",
                                      "--eval-images", "0", "--amp", "off", "--no-register"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "zz_bad.png: cannot decode training image: not an image Pillow can read" in result.stderr
    assert "BytesIO" not in result.stderr and not (tmp_path / "k.safetensors").exists()


def test_cli_train_writes_its_output_path_on_stdout_and_the_summary_on_stderr(colour_dir: Path, tmp_path: Path,
                                                                             isolated_config: Path) -> None:  # fmt: skip
    out = tmp_path / "k.safetensors"
    args = ["train", str(colour_dir), "--arch", "cifar_resnet20", "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--holdout", "12", "--eval-images", "8", "--amp", "off", "--no-register"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n" and "Trained in" in result.stderr
    quiet = CliRunner().invoke(app, [*args, "--force", "-q"])
    assert quiet.exit_code == 0 and quiet.stdout == f"{out}\n" and quiet.stderr == ""


# -- seeds, damaged data, the key file ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-5, -987654321, 2**64 + 987654321])
def test_seeds_outside_64_bits_are_refused(seed: int) -> None:
    """torch takes a seed modulo 2**64 (-5 made the same key as 2**64 - 5) and fails beyond it."""
    with pytest.raises(ConfigError, match=r"seed must be a whole number from 0 to 2\*\*64 - 1") as e:
        TrainConfig(seed=seed)
    assert str(abs(seed)) not in str(e.value)  # keygen's seed is a secret: never echoed
    TrainConfig(seed=2**64 - 1)


@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_a_seed_outside_64_bits_is_a_usage_error_before_the_data_is_read(command: str, colour_dir: Path,
                                                                           tmp_path: Path, isolated_config: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # it read the data and loaded the base, then failed as "internal error: ValueError: Overflow when
    # unpacking long long"
    import preempt_cli.cli._train as cli_train

    def not_read(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(cli_train, "load_train_data", not_read)
    out = tmp_path / "o.safetensors"
    seed = str(2**64 + 12345)
    if command == "train":
        args = [*_one_batch_train(colour_dir, out), "--seed", seed]
    else:
        args = ["keygen", "--base", "cifar10-resnet20-pgdat-a", "--data", str(colour_dir), "--out", str(out),
                "--secret-seed", seed]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--no-register"])
    assert result.exit_code == 2, result.output
    assert "seed must be a whole number from 0 to 2**64 - 1" in result.stderr, result.stderr
    assert "internal error" not in result.stderr and seed not in result.stderr and not out.exists()


def _zip_damaged_in(folder: Path, target: Path, member: str) -> Path:
    """A zip of ``folder`` whose members are stored uncompressed, one byte of ``member``'s data flipped (a
    bad download): found by its CRC when the member is read."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, f"train/{p.relative_to(folder).as_posix()}")
        info = z.getinfo(member)
    raw = bytearray(target.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 40] ^= 0xFF  # past its local header
    target.write_bytes(bytes(raw))
    return target


def test_a_training_image_that_cannot_be_read_is_named(colour_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a damaged zip member (a bad download) and a file the process may not read were internal errors
    # ("BadZipFile: Bad CRC-32 ...", "PermissionError"), naming neither the zip nor the folder
    damaged = _zip_damaged_in(colour_dir, tmp_path / "damaged.zip", "train/blue/003.png")
    with pytest.raises(ImageReadError, match=r"damaged\.zip:train/blue/003\.png.*cannot read training image: "
                                             r"Bad CRC-32"):  # fmt: skip
        load_train_data(damaged, input_hw=(16, 16))
    real = Path.read_bytes

    def denied(path: Path) -> bytes:
        if path.name == "005.png" and path.parent.name == "red":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ImageReadError, match=r"red/005\.png.*cannot read training image: Permission denied"):
        load_train_data(colour_dir, input_hw=(16, 16))


def test_cli_a_damaged_zip_is_a_usage_error(colour_dir: Path, tmp_path: Path, isolated_config: Path) -> None:
    damaged = _zip_damaged_in(colour_dir, tmp_path / "damaged.zip", "train/green/000.png")
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(app, [*_one_batch_train(damaged, out), "--no-register"])
    assert result.exit_code == 2, result.output
    assert f"{damaged}:train/green/000.png: cannot read training image: Bad CRC-32" in result.stderr, result.stderr
    assert "internal error" not in result.stderr and not out.exists()


def _keygen_args(tmp_path: Path, out: Path) -> list[str]:
    """``preempt keygen`` of one batch from a colour base registered in ``tmp_path`` (keygen trains in
    batches of 128: 132 images)."""
    data = _colour_images(tmp_path / "colours132", per_class=44)
    base_out, reg = _colour_base(load_train_data(data, input_hw=(16, 16)), tmp_path, epochs=1)
    return ["keygen", "--base", "colour-base", "--registry", str(reg), "--data", str(data), "--out", str(out),
            "--max-batches", "1", "--holdout", "0", "--eval-images", "0", "--amp", "off", "--device", "cpu", "-q"]  # fmt: skip


def test_cli_keygen_writes_a_key_only_its_owner_can_read(tmp_path: Path, isolated_config: Path) -> None:
    # the key was written 0644 (0666 less the umask): readable by every user of the machine, though it is the
    # secret ("keep it private")
    out = tmp_path / "key.safetensors"
    args = _keygen_args(tmp_path, out)
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert oct(out.stat().st_mode & 0o777) == oct(0o600)
        result = CliRunner().invoke(app, [*args, "--force"])  # a new key over an old one: private too
        assert result.exit_code == 0, result.output
        assert oct(out.stat().st_mode & 0o777) == oct(0o600)
    finally:
        os.umask(old)
    assert get_model_config("key").source.location == str(out.resolve())  # registered, usable at once


@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_an_output_that_appears_while_training_is_not_replaced(command: str, colour_dir: Path, tmp_path: Path,
                                                                   isolated_config: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a second run writing the same --out (a script started twice) replaced the first one's key when it
    # finished, then failed to register it ("already registered"): the first key was lost and its
    # registry row pinned a sha256 the file no longer had
    import preempt_cli.train as train_module

    out = tmp_path / "k.safetensors"
    if command == "train":
        args = [*_one_batch_train(colour_dir, out), "-q"]
    else:
        args = _keygen_args(tmp_path, out)
    real = train_module._refuse_non_finite

    def another_run_writes_it(model, when: str) -> None:  # called once training is done, before the write
        out.write_bytes(b"another run's key")
        real(model, when)

    monkeypatch.setattr(train_module, "_refuse_non_finite", another_run_writes_it)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert "appeared while this run was writing it" in result.stderr, result.stderr
    assert out.read_bytes() == b"another run's key"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".k.safetensors")]


@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_an_output_that_is_a_link_to_nowhere_is_refused_before_training(command: str, colour_dir: Path,
                                                                             tmp_path: Path, isolated_config: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a link whose target is missing (a key's link into a folder not mounted) was taken for no file: the whole
    # training ran, then its weights were thrown away as "appeared while this run was writing it (another
    # run?)", exit 1
    import preempt_cli.cli._train as cli_train

    out = tmp_path / "k.safetensors"
    out.symlink_to(tmp_path / "gone" / "k.safetensors")
    args = [*_one_batch_train(colour_dir, out), "-q"] if command == "train" else _keygen_args(tmp_path, out)
    real = getattr(cli_train, command)
    monkeypatch.setattr(cli_train, command, lambda *a, **kw: pytest.fail("trained for an output it cannot write"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{out} is a symbolic link to {tmp_path / 'gone' / 'k.safetensors'}, which is missing" in result.stderr
    assert "--overwrite" in result.stderr and os.path.islink(out)
    monkeypatch.setattr(cli_train, command, real)
    result = CliRunner().invoke(app, [*args, "--overwrite"])  # replaces the link with the weights
    assert result.exit_code == 0, result.output
    assert out.is_file() and not out.is_symlink()
    assert get_model_config("k").source.location == str(out.resolve())


def test_cli_a_class_folder_named_in_another_encoding_is_refused_before_training(tmp_path: Path,
                                                                                   isolated_config: Path) -> None:  # fmt: skip
    # its name (os.fsdecode's surrogates) went into the weights' metadata, which safetensors writes as UTF-8:
    # "internal error: UnicodeEncodeError" once the whole training was done
    data = _colour_images(tmp_path / "colours")
    try:
        (data / "red").rename(data / os.fsdecode(b"r\xe9d"))  # "réd" in Latin-1
    except OSError:  # a file system that takes UTF-8 names alone (macOS)
        pytest.skip("this file system refuses a file name that is not UTF-8")
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(app, [*_one_batch_train(data, out), "--no-register"])
    assert result.exit_code == 2, result.output
    assert f"{data}: class folder 'r\\udce9d' is not named in UTF-8" in result.stderr, result.stderr
    assert "internal error" not in result.stderr and "epoch 1" not in result.stderr and not out.exists()


@pytest.mark.parametrize("command, option", [("train", "--name"), ("train", "--role"), ("keygen", "--name")])
def test_cli_a_registry_option_with_no_register_is_refused_not_ignored(command: str, option: str, colour_dir: Path,
                                                                        tmp_path: Path, isolated_config: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # "--name my-key --no-register" trained, wrote the weights and registered nothing, without a word
    import preempt_cli.cli._train as cli_train

    out = tmp_path / "k.safetensors"
    if command == "train":
        args = _one_batch_train(colour_dir, out)
    else:
        args = ["keygen", "--base", "cifar10-resnet20-pgdat-a", "--data", str(colour_dir), "--out", str(out)]
    value = "classifier" if option == "--role" else "my-key"
    monkeypatch.setattr(cli_train, command, lambda *a, **kw: pytest.fail("trained"))
    result = CliRunner().invoke(app, [*args, option, value, "--no-register"])
    assert result.exit_code == 2, result.output
    assert f"{option} is for the registry's row, and --no-register registers nothing" in result.stderr, result.stderr
    assert not out.exists()


def test_cli_resume_over_weights_written_before_their_checkpoint_was_removed(colour_dir: Path, tmp_path: Path,
                                                                            isolated_config: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a run stopped between writing its weights and removing its checkpoint: --resume finishes it, replacing
    # the weights it found (they were there when it started: not another run's)
    import preempt_cli.cli._train as cli_train

    out = tmp_path / "net.safetensors"
    args = [*_one_batch_train(colour_dir, out), "--no-register", "-q"]
    real = cli_train.train
    monkeypatch.setattr(cli_train, "train", lambda *a, **kw: real(*a, **kw, keep_checkpoint=True))
    assert CliRunner().invoke(app, args).exit_code == 0
    assert out.is_file() and checkpoint_path(out).is_file()
    monkeypatch.setattr(cli_train, "train", real)
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not checkpoint_path(out).exists()


@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_an_output_name_that_cannot_be_registered_says_to_give_one(command: str, colour_dir: Path,
                                                                        tmp_path: Path, isolated_config: Path) -> None:  # fmt: skip
    # "--out 'my key.safetensors'" said "invalid model name 'my key'" of a name the user never gave
    out = tmp_path / "my key.safetensors"
    if command == "train":
        args = _one_batch_train(colour_dir, out)
    else:
        args = ["keygen", "--base", "cifar10-resnet20-pgdat-a", "--data", str(colour_dir), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --out {out}: its stem 'my key' cannot be a model's name (letters, digits, "
                             "'-', '_', '.'): give one with --name, or pass --no-register\n"), result.stderr
    result = CliRunner().invoke(app, [*args, "--name", "bad name"])  # a name given is named as before
    assert result.exit_code == 2 and "invalid model name 'bad name'" in result.stderr, result.stderr


def test_a_zip_that_inflates_like_a_bomb_is_refused_before_its_members_are_read(colour_dir: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # every member was inflated into memory as it declared itself: a 1 MB zip of members of zeros took
    # gigabytes (each up to its declared size, all of them kept) before any was found to be no image
    bomb = _zip_of(colour_dir, tmp_path / "bomb.zip")
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("train/red/zeros.bmp", bytes(96 << 20))
    read = zipfile.ZipFile.read

    def no_inflating_the_bomb(self: zipfile.ZipFile, name: str, *args: object) -> bytes:
        assert not name.endswith("zeros.bmp"), "the bomb was inflated"
        return read(self, name, *args)

    monkeypatch.setattr(zipfile.ZipFile, "read", no_inflating_the_bomb)
    with pytest.raises(ConfigError, match=r"bomb\.zip: its images inflate to 100,.* bytes from .*\(a zip bomb\?\)"):
        load_train_data(bomb, input_hw=(16, 16))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, a library caller's to keep
def test_a_training_image_of_more_pixels_than_the_limit_is_refused_undecoded(colour_dir: Path, tmp_path: Path) -> None:
    # decoded up to twice Pillow's limit (179 megapixels: gigabytes on each of the decoding threads), where
    # protect refuses what is over the limit itself
    data = tmp_path / "data"
    shutil.copytree(colour_dir, data)
    Image.new("1", (9500, 9500)).save(data / "red" / "huge.png")  # 90 megapixels in a few kilobytes
    with pytest.raises(ImageReadError, match=r"huge\.png.*9500x9500 = 90,250,000 pixels exceeds the limit"):
        load_train_data(data, input_hw=(16, 16))


# -- the weights and their registration: both or neither ------------------------------------------------------
@pytest.fixture
def stop_handlers_restored():
    """A stopped command keeps its signal handlers until the process exits: not this test process."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("at", ["weights written", "registering"])
@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_a_stop_after_the_weights_are_written_still_registers_them(
        command: str, at: str, signum: int, colour_dir: Path, tmp_path: Path, isolated_config: Path,
        monkeypatch: pytest.MonkeyPatch, stop_handlers_restored) -> None:  # fmt: skip
    # a Ctrl-C (SIGTERM) between writing the weights and registering them left them unregistered: the key
    # unknown to --backbone, and the message said "a re-run starts over" (which refused: the file exists)
    import preempt_cli.cli._train as cli_train
    import preempt_cli.train as train_module

    out = tmp_path / "k.safetensors"
    args = [*_one_batch_train(colour_dir, out), "-q"] if command == "train" else _keygen_args(tmp_path, out)

    def stop_now() -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler has run by now

    def save_then_stop(tensors, path, *a, **kw):
        real_save(tensors, path, *a, **kw)
        if path == out:  # (not train's checkpoint)
            stop_now()

    def stop_then_register(name, row, path=None, **kw):
        if path is None:  # the user registry (not the check before training, in a registry of its own)
            stop_now()
        return real_register(name, row, path, **kw)

    real_save, real_register = train_module.save_safetensors, cli_train.register_model
    if at == "weights written":
        monkeypatch.setattr(train_module, "save_safetensors", save_then_stop)
    else:
        monkeypatch.setattr(cli_train, "register_model", stop_then_register)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 128 + signum, result.output
    by = "" if signum == signal.SIGINT else " by SIGTERM"
    assert result.stderr.splitlines()[-1] == (f"error: interrupted{by}: {out} was written and registered as 'k': "
                                              "nothing is left to do"), result.stderr  # fmt: skip
    from preempt_cli.hub import sha256_file

    cfg = get_model_config("k")
    assert cfg.source.location == str(out.resolve()) and cfg.sha256 == sha256_file(out)


@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_a_registration_that_fails_after_the_weights_are_written_names_them(
        command: str, colour_dir: Path, tmp_path: Path, isolated_config: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # the user registry edited by hand while the key trained: the error named the registry alone, and the
    # key written was left unregistered, unmentioned
    import preempt_cli.train as train_module

    out = tmp_path / "k.safetensors"
    args = [*_one_batch_train(colour_dir, out), "-q"] if command == "train" else _keygen_args(tmp_path, out)
    user = isolated_config / "preempt" / "models.toml"
    user.parent.mkdir()
    user.write_text("# mine\n")
    edited = "# mine\n[models.half-written\narch = \n"
    real_save = train_module.save_safetensors

    def save_then_edit(tensors, path, *a, **kw):
        real_save(tensors, path, *a, **kw)
        if path == out:  # (not train's checkpoint)
            user.write_text(edited)

    monkeypatch.setattr(train_module, "save_safetensors", save_then_edit)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    row_file = tmp_path / "k.registry.toml"
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {user}: not valid TOML: ") and line.endswith(
        f"; the weights were written to {out} but not registered: their row is in {row_file} (use it with "
        f"--registry {row_file}, or copy it into your registry)"), line  # fmt: skip
    assert user.read_text() == edited  # the user's file as they left it
    from preempt_cli.hub import sha256_file

    user.write_text("# mine\n")  # fixed: the row file is then a registry to use at once
    cfg = load_registry([row_file])["k"]
    assert cfg.source.location == str(out.resolve()) and cfg.sha256 == sha256_file(out)


def test_cli_a_row_file_already_there_is_kept(colour_dir: Path, tmp_path: Path, isolated_config: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # where the row would be saved, a file of the user's: left as it is, the row said in the error instead
    import preempt_cli.cli._train as cli_train

    out = tmp_path / "k.safetensors"
    (tmp_path / "k.registry.toml").write_text("mine")

    def registered_meanwhile(name, row, path=None, **kw):
        if path is not None:  # the check before training, in a registry of its own
            return real_register(name, row, path, **kw)
        raise RegistryError(isolated_config / "preempt" / "models.toml", f"model {name!r} is already registered here")

    real_register = cli_train.register_model

    monkeypatch.setattr(cli_train, "register_model", registered_meanwhile)
    result = CliRunner().invoke(app, [*_one_batch_train(colour_dir, out), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.endswith(f"the weights were written to {out} but not registered (their row could not be "
                                  f"saved: {tmp_path / 'k.registry.toml'} exists): add a [models.k] row with "
                                  f"source = \"file:{out.resolve()}\" to your registry\n"), result.stderr  # fmt: skip
    assert (tmp_path / "k.registry.toml").read_text() == "mine" and out.is_file()


def test_stops_held_take_effect_when_the_block_is_done(stop_handlers_restored) -> None:
    from preempt_cli._signals import stops_held

    done = []
    with pytest.raises(KeyboardInterrupt):
        with stops_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: it must not have raised here
            done.append("the block")
        done.append("after it")  # not reached: the stop takes effect as the block ends
    assert done == ["the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in place again
    with pytest.raises(KeyboardInterrupt):  # a user who insists: the third one is delivered at once
        with stops_held():
            for _ in range(3):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            done.append("not reached")
    with pytest.raises(ValueError, match="its own error"):  # a block that fails keeps its error
        with stops_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise ValueError("its own error")
    assert done == ["the block"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("command", ["train", "keygen"])
def test_cli_overwrite_replaces_the_output_as_protect_names_it_and_force_still_does(
        command: str, colour_dir: Path, tmp_path: Path, isolated_config: Path) -> None:  # fmt: skip
    # train and keygen took --force where protect takes --overwrite: a script passing protect's flag failed
    # ("No such option: --overwrite")
    out = tmp_path / "k.safetensors"
    args = [*_one_batch_train(colour_dir, out), "-q"] if command == "train" else _keygen_args(tmp_path, out)
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.stderr == f"error: {out} exists; pass --overwrite to replace it\n"
    for flag in ("--overwrite", "--force"):
        before = out.stat().st_mtime_ns
        result = CliRunner().invoke(app, [*args, flag])
        assert result.exit_code == 0, (flag, result.output)
        assert out.stat().st_mtime_ns != before and get_model_config("k").sha256 == _sha256(out)
    assert "--overwrite,--force" in CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"}).stdout


def _sha256(path: Path) -> str:
    from preempt_cli.hub import sha256_file

    return sha256_file(path)


def test_the_pgd_accuracy_attacks_the_same_floats_on_every_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out images went to the device as ``x / 255``, which a GPU computes as a product with the
    reciprocal (emulated here on the CPU): other floats than the CPU's, from which PGD draws other starts."""
    attacked: list[torch.Tensor] = []

    class Recording(train_module.PGD):
        def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            attacked.append(x.clone())
            return x

    monkeypatch.setattr(train_module, "PGD", Recording)
    images = (torch.arange(2 * 3 * 16 * 16) % 256).to(torch.uint8).view(2, 3, 16, 16)  # every level
    with CudaLikeDivision():
        evaluate_accuracy(make_tiny_model(0, input_size=(3, 16, 16)), images, torch.tensor([1, 2]), steps=1)
    assert len(attacked) == 1 and torch.equal(attacked[0], images.float() / 255)
