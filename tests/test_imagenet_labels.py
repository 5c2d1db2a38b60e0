"""Ground-truth labels of ImageNet-1k models: a WordNet synset (``n01440764``: the folders of ImageNet's own
layout), a class name as timm gives it, or an index. The registry's ImageNet rows had no class names, so every
file of ``ROOT/n01440764/...`` failed as an unknown class. Tiny images and tiny models only (no weights)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import TEST_DEVICE, make_tiny_model, write_random_pngs
from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs
from preempt_cli.errors import LabelError
from preempt_cli.evaluate import load_dataset
from preempt_cli.labels import folder_label, read_label_file, resolve_label
from preempt_cli.registry import ModelConfig, Source, load_registry

timm_data = pytest.importorskip("timm.data", reason="timm gives ImageNet's class names and synsets")


def _imagenet_config(**changes) -> ModelConfig:
    return ModelConfig(name="in1k", arch="tiny_cnn", source=Source("file", "in1k.safetensors"),
                       dataset="imagenet-1k", num_classes=1000, **changes)  # fmt: skip


@pytest.fixture(scope="module")
def imagenet() -> timm_data.ImageNetInfo:
    return timm_data.ImageNetInfo("imagenet-1k")


def test_imagenet_rows_resolve_synsets_timm_names_and_indices(imagenet) -> None:
    synsets, names = imagenet.label_names(), imagenet.label_descriptions()
    registry = load_registry()
    for cfg in (registry["deit-b"], registry["convnext-l-convstem"], _imagenet_config()):
        assert cfg.class_synsets == tuple(synsets) and cfg.class_names == tuple(names)
        for index in (0, 1, 417, 999):
            assert cfg.class_index(synsets[index]) == index
            assert cfg.class_index(names[index]) == index
            assert cfg.class_index(names[index].upper()) == index
            assert cfg.class_index(str(index)) == index
            assert cfg.class_name(index) == names[index]
        assert cfg.class_index("n01440764") == 0  # ImageNet's first folder: the tench
        with pytest.raises(ValueError, match="unknown class 'n99999999'"):
            cfg.class_index("n99999999")


def test_a_name_of_two_imagenet_classes_is_refused_naming_their_synsets(imagenet) -> None:
    # timm names two classes "crane" (the bird and the machine): either one would label half the files wrongly
    names = imagenet.label_descriptions()
    twice = sorted({n for n in names if names.count(n) > 1})
    assert twice, "timm's ImageNet names are all distinct now: this test has nothing to check"
    cfg = _imagenet_config()
    for name in twice:
        indices = [i for i, n in enumerate(names) if n == name]
        with pytest.raises(ValueError, match="ambiguous") as caught:
            cfg.class_index(name)
        for i in indices:
            assert f"{i} ({imagenet.label_names()[i]}: {names[i]})" in str(caught.value)
            assert cfg.class_index(imagenet.label_names()[i]) == i


def _synonym_classes(names: list[str]) -> dict[str, list[int]]:
    """Each synonym that timm's ImageNet names list (``tench`` and ``Tinca tinca`` of ``tench, Tinca tinca``), in
    lower case, to the classes whose names list it."""
    classes: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        for synonym in dict.fromkeys(s.strip().lower() for s in name.split(",")):
            classes.setdefault(synonym, []).append(index)
    return classes


def test_each_synonym_of_one_imagenet_class_names_it(imagenet) -> None:
    # "tench" was an unknown class: only timm's whole name "tench, Tinca tinca" was one
    names = imagenet.label_descriptions()
    cfg = _imagenet_config()
    assert cfg.class_index("tench") == 0 and cfg.class_index(" Tinca Tinca ") == 0
    assert cfg.class_index("great white shark") == cfg.class_index("man-eater") == 2
    synonyms = _synonym_classes(names)
    unique = {synonym: found[0] for synonym, found in synonyms.items() if len(found) == 1}
    assert len(unique) > 1000  # most classes have more than one
    for synonym, index in unique.items():
        assert cfg.class_index(synonym) == index and cfg.class_index(synonym.upper()) == index, synonym
    for index, name in enumerate(names):  # timm's whole names still name their classes, save one another shares
        if len(synonyms.get(name.lower(), [index])) == 1:
            assert cfg.class_index(name) == index


def test_a_synonym_of_several_imagenet_classes_is_refused_naming_their_synsets(imagenet) -> None:
    synsets, names = imagenet.label_names(), imagenet.label_descriptions()
    shared = {synonym: found for synonym, found in _synonym_classes(names).items() if len(found) > 1}
    # "maillot" is class 638's whole name and a synonym of 639 (maillot, tank suit), "panda" the lesser and
    # the giant panda's: either class may be the one meant (a list of each class's first synonym names both
    # "maillot"), so neither is guessed
    assert "maillot" in shared and "panda" in shared
    cfg = _imagenet_config()
    for synonym, indices in shared.items():
        with pytest.raises(ValueError, match="ambiguous") as caught:
            cfg.class_index(synonym)
        assert all(f"{i} ({synsets[i]}: {names[i]})" in str(caught.value) for i in indices), str(caught.value)
    with pytest.raises(LabelError, match="ambiguous"):
        resolve_label("Panda", cfg, "x.png")


def test_other_rows_keep_their_classes_and_get_no_synsets() -> None:
    registry = load_registry()
    cifar = registry["preempt-resnet20-at"]
    assert cifar.class_synsets is None and cifar.class_names == cifar.classes
    assert cifar.class_index("cat") == 3 and cifar.class_index("Cat") == 3 and cifar.class_name(3) == "cat"
    with pytest.raises(ValueError, match="unknown class 'n01440764'"):
        cifar.class_index("n01440764")
    # names of its own win over timm's; another class count is no ImageNet-1k
    own = _imagenet_config(classes=tuple(f"c{i}" for i in range(1000)))
    assert own.class_synsets is None and own.class_index("c7") == 7 and own.class_name(7) == "c7"
    for other in (dataclasses.replace(_imagenet_config(), num_classes=10), dataclasses.replace(cifar, dataset="x")):
        assert other.class_names in (None, cifar.classes) and other.class_synsets is None
    # a row's own names are whole names, not lists of synonyms: "boots, rubber" (preempt train joins names
    # with commas) is no class "boots"
    boots = dataclasses.replace(cifar, classes=("boots, rubber", "hats", "Hats", *cifar.classes[3:]))
    assert boots.class_index("Boots, Rubber") == 0 and boots.class_index("Hats") == 2
    with pytest.raises(ValueError, match="unknown class 'boots'"):
        boots.class_index("boots")
    with pytest.raises(ValueError, match=r"'HATS' is ambiguous: it names classes 1, 2; give the index$"):
        boots.class_index("HATS")


def test_folders_and_label_files_in_imagenets_layout_label_each_file(tmp_path: Path, imagenet) -> None:
    synsets, names = imagenet.label_names(), imagenet.label_descriptions()
    for index in (0, 1, 999):
        write_random_pngs(tmp_path / "val" / synsets[index], n=1, size=(8, 8), name=f"ILSVRC_{index}.png")
    cfg = _imagenet_config()
    items = collect_inputs([tmp_path / "val"])
    assert {resolve_label(folder_label(i), cfg, str(i.path)) for i in items} == {0, 1, 999}
    for item in items:
        assert synsets[resolve_label(folder_label(item), cfg, str(item.path))] == item.path.parent.name
    # a label file may name the synset, timm's name, or the index
    (tmp_path / "labels.csv").write_text(f'file,label\n{synsets[0]}/ILSVRC_0,{synsets[0]}\n'
                                         f'ILSVRC_1.png,"{names[1]}"\nILSVRC_999.png,999\n')  # fmt: skip
    labels = read_label_file(tmp_path / "labels.csv")
    assert {i.path.name: resolve_label(labels.lookup(i), cfg, str(i.path)) for i in items} == \
        {"ILSVRC_0.png": 0, "ILSVRC_1.png": 1, "ILSVRC_999.png": 999}  # fmt: skip
    with pytest.raises(LabelError, match="unknown class 'n99999999'"):
        resolve_label("n99999999", cfg, "x.png")


def test_eval_reads_imagenets_synset_folders(tmp_path: Path, imagenet) -> None:
    synsets = imagenet.label_names()
    for index in (0, 5, 999):
        write_random_pngs(tmp_path / "val" / synsets[index], n=1, size=(8, 8), name=f"{index}.png")
    write_random_pngs(tmp_path / "val" / "goldfish", n=1, size=(8, 8), name="1.png")  # a synonym's folder
    cfg = _imagenet_config()
    dataset = load_dataset(tmp_path / "val", classes=cfg.class_names, synsets=cfg.class_synsets)
    labels = dict(zip((p.name for p in dataset.paths), dataset.labels.tolist()))
    assert labels == {"0.png": 0, "1.png": 1, "5.png": 5, "999.png": 999}
    assert dataset.classes == cfg.class_names
    # a synonym of the spiny lobster and of the crayfish
    write_random_pngs(tmp_path / "val" / "crawfish", n=1, size=(8, 8), name="123.png")
    with pytest.raises(LabelError, match="crawfish.*ambiguous"):
        load_dataset(tmp_path / "val", classes=cfg.class_names, synsets=cfg.class_synsets)


def test_protect_labels_folders_runs_on_an_imagenet_model(tmp_path: Path, imagenet) -> None:
    synsets, names = imagenet.label_names(), imagenet.label_descriptions()
    write_random_pngs(tmp_path / "in" / synsets[0], n=1, size=(16, 16))
    write_random_pngs(tmp_path / "in" / synsets[1], n=1, size=(16, 16), seed=1)
    model = make_tiny_model(0, input_size=(3, 16, 16), num_classes=1000)
    model.config = dataclasses.replace(model.config, dataset="imagenet-1k")
    protector = Protector(model.to(TEST_DEVICE), config=ForeBackConfig(samples=2), labels="folders", seed=0)
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out")))
    assert [r.status for r in results] == ["done", "done"], [r.reason for r in results]
    assert sorted((r.label, r.label_name) for r in results) == [(0, names[0]), (1, names[1])]


def test_imagenets_classes_are_read_when_a_label_is_first_resolved_not_by_models_show(monkeypatch, imagenet) -> None:
    """Listing or showing the registry's ImageNet rows does not read timm's class lists (importing timm takes
    seconds); ``models show`` printed ``classes: null`` for them, as for a row whose classes have no names."""
    import json

    from typer.testing import CliRunner

    from preempt_cli import registry
    from preempt_cli.cli import app

    reads = []

    class CountedImageNetInfo(timm_data.ImageNetInfo):
        def __init__(self, *args, **kwargs) -> None:
            reads.append(args)
            super().__init__(*args, **kwargs)

    registry._timm_class_set.cache_clear()
    monkeypatch.setattr(timm_data, "ImageNetInfo", CountedImageNetInfo)
    try:
        shown = json.loads(CliRunner().invoke(app, ["models", "show", "deit-b", "--json"]).stdout)
        assert shown["classes"] is None and shown["classes_from"] == "timm" and shown["num_classes"] == 1000
        human = CliRunner().invoke(app, ["models", "show", "deit-b"])
        assert human.exit_code == 0, human.output
        line = next(x for x in human.stdout.splitlines() if x.startswith("classes "))
        assert "1000" in line and "timm" in line and imagenet.label_descriptions()[1] not in human.stdout
        cifar = json.loads(CliRunner().invoke(app, ["models", "show", "preempt-resnet20-at", "--json"]).stdout)
        assert cifar["classes_from"] == "registry" and cifar["classes"][3] == "cat"
        assert reads == []
        assert _imagenet_config().class_index("tench") == 0 and load_registry()["deit-b"].class_index("tench") == 0
        assert reads == [("imagenet-1k",)]  # once, for every row
    finally:
        registry._timm_class_set.cache_clear()  # not a class set read through the stand-in
