"""Which files a run takes and where their outputs go (no models involved)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from preempt_cli.inputs import InputFile, assign_outputs, kernel_folder, output_path


def _outputs(items: list[InputFile], out_dir: Path | None = None) -> dict[str, Path | str]:
    return {str(i.path): o for i, o in assign_outputs(items, suffix=".protected", out_dir=out_dir).items()}


def test_outputs_of_one_folder_sharing_a_stem_keep_their_extension(tmp_path: Path) -> None:
    items = [InputFile(tmp_path / "a.jpg", tmp_path), InputFile(tmp_path / "a.png", tmp_path),
             InputFile(tmp_path / "b.png", tmp_path)]  # fmt: skip
    out = _outputs(items)
    assert out[str(tmp_path / "a.jpg")] == tmp_path / "a.jpg.protected.png"
    assert out[str(tmp_path / "a.png")] == tmp_path / "a.png.protected.png"
    assert out[str(tmp_path / "b.png")] == tmp_path / "b.protected.png"


def test_names_differing_only_in_case_are_one_file_on_macos_and_windows(tmp_path: Path) -> None:
    out = _outputs([InputFile(tmp_path / "A.jpg", tmp_path), InputFile(tmp_path / "a.png", tmp_path)])
    assert out[str(tmp_path / "A.jpg")] == tmp_path / "A.jpg.protected.png"
    assert out[str(tmp_path / "a.png")] == tmp_path / "a.png.protected.png"


def test_same_names_from_several_folders_into_one_out_dir_are_refused_not_overwritten(tmp_path: Path) -> None:
    # files named directly (or read from stdin) land flat in --out-dir: the same name twice is one output
    a, b, c = tmp_path / "cams/a/IMG_1.jpg", tmp_path / "cams/b/IMG_1.jpg", tmp_path / "cams/b/IMG_2.jpg"
    out = _outputs([InputFile(a), InputFile(b), InputFile(c)], out_dir=tmp_path / "out")
    assert "would also be written for" in out[str(a)] and str(b) in out[str(a)]
    assert "would also be written for" in out[str(b)] and str(a) in out[str(b)]
    assert out[str(c)] == tmp_path / "out/IMG_2.protected.png"
    # given as folders, the tree is mirrored and nothing collides
    mirrored = _outputs([InputFile(a, tmp_path / "cams"), InputFile(b, tmp_path / "cams")], out_dir=tmp_path / "out")
    assert mirrored == {str(a): tmp_path / "out/a/IMG_1.protected.png", str(b): tmp_path / "out/b/IMG_1.protected.png"}


def test_several_folders_into_one_out_dir_each_go_under_their_own_name(tmp_path: Path) -> None:
    # `preempt protect day1 day2 -o out`: both hold IMG_1.jpg; as `cp -r day1 day2 out`, not one output
    a, b = tmp_path / "day1/IMG_1.jpg", tmp_path / "day2/sub/IMG_1.jpg"
    loose = tmp_path / "elsewhere/IMG_9.jpg"
    items = [InputFile(a, tmp_path / "day1"), InputFile(b, tmp_path / "day2"), InputFile(loose)]
    assert _outputs(items, out_dir=tmp_path / "out") == {
        str(a): tmp_path / "out/day1/IMG_1.protected.png",
        str(b): tmp_path / "out/day2/sub/IMG_1.protected.png",
        str(loose): tmp_path / "out/IMG_9.protected.png",
    }
    # one folder: its tree is mirrored as before (no folder-name level)
    assert _outputs(items[:1], out_dir=tmp_path / "out") == {str(a): tmp_path / "out/IMG_1.protected.png"}
    # two folders of one name still meet: refused, naming the real clash and what to do
    c = tmp_path / "other/day1/IMG_1.jpg"
    clash = _outputs([InputFile(a, tmp_path / "day1"), InputFile(c, tmp_path / "other/day1")], out_dir=tmp_path / "out")
    for mine, theirs in ((a, c), (c, a)):
        reason = clash[str(mine)]
        assert isinstance(reason, str) and str(tmp_path / "out/day1/IMG_1.protected.png") in reason
        assert str(theirs) in reason and "two folders named 'day1'" in reason


def test_a_clash_inside_one_folder_is_not_blamed_on_folders_of_one_name(tmp_path: Path) -> None:
    items = [InputFile(tmp_path / "photos" / n, tmp_path / "photos") for n in ("a.jpg", "a.png", "a.jpg.png")]
    out = _outputs(items, out_dir=tmp_path / "out")
    reason = out[str(tmp_path / "photos" / "a.jpg")]
    assert isinstance(reason, str) and "two folders" not in reason
    assert str(tmp_path / "out" / "a.jpg.protected.png") in reason  # where they met, not a.protected.png


def test_a_symlinked_folder_keeps_its_own_name_under_out_dir(tmp_path: Path) -> None:
    (tmp_path / "day3").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "day3")
    a, b = tmp_path / "latest" / "x.jpg", tmp_path / "day1" / "y.jpg"
    out = _outputs([InputFile(a, tmp_path / "latest"), InputFile(b, tmp_path / "day1")], out_dir=tmp_path / "o")
    assert out[str(a)] == tmp_path / "o" / "latest" / "x.protected.png"


def test_a_fallback_name_that_collides_again_is_refused(tmp_path: Path) -> None:
    # a.jpg and a.png share a stem -> a.jpg.protected.png, which is also the first choice of a.jpg.png
    items = [InputFile(tmp_path / n, tmp_path) for n in ("a.jpg", "a.png", "a.jpg.png")]
    out = _outputs(items)
    assert isinstance(out[str(tmp_path / "a.jpg")], str) and isinstance(out[str(tmp_path / "a.jpg.png")], str)
    assert out[str(tmp_path / "a.png")] == tmp_path / "a.png.protected.png"


def test_preempt_outputs_among_the_inputs_do_not_block_their_originals(tmp_path: Path) -> None:
    # a shell glob over a folder after a run names the outputs too: they are skipped, not originals
    items = [InputFile(tmp_path / "photo.png"), InputFile(tmp_path / "photo.protected.png")]
    assert _outputs(items)[str(tmp_path / "photo.png")] == tmp_path / "photo.protected.png"
    assert _outputs([InputFile(tmp_path / "x.PNG")])[str(tmp_path / "x.PNG")] == tmp_path / "x.protected.png"


def _label_file(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("file,label\n" + rows)
    return path


def test_labels_match_the_longest_listed_part_of_a_path_from_any_root(tmp_path: Path) -> None:
    from preempt_cli.labels import read_label_file

    labels = read_label_file(_label_file(tmp_path, "cat/001.png,cat\ndog/001.png,dog\n002.png,bird\n"))
    data = tmp_path / "dataset" / "train"
    assert labels.lookup(InputFile(data / "cat/001.png", data.parent)) == "cat"  # one level above the listing
    assert labels.lookup(InputFile(data / "dog/001.png")) == "dog"  # named directly / from stdin
    assert labels.lookup(InputFile(data / "x/002.png", data)) == "bird"
    assert labels.lookup(InputFile(data / "x/002.jpg", data)) == "bird"  # by stem


def test_a_name_shared_by_entries_with_different_labels_is_ambiguous_not_first_come(tmp_path: Path) -> None:
    import pytest

    from preempt_cli.errors import LabelError
    from preempt_cli.labels import read_label_file

    labels = read_label_file(_label_file(tmp_path, "a/cat/001.png,cat\nb/cat/001.png,dog\nx/s/7.png,3\ny/s/7.png,3\n"))
    with pytest.raises(LabelError, match="ambiguous"):
        labels.lookup(InputFile(tmp_path / "c/cat/001.png", tmp_path))
    with pytest.raises(LabelError, match="ambiguous"):
        labels.lookup(InputFile(tmp_path / "cat/001.jpg"))  # without the extension too
    assert labels.lookup(InputFile(tmp_path / "z/s/7.png", tmp_path)) == "3"  # shared, but the same label
    with pytest.raises(LabelError, match="an earlier row"):
        read_label_file(_label_file(tmp_path, "a.png,cat\na.png,dog\n"))


def test_a_file_the_label_file_leaves_out_never_takes_a_label_listed_for_another_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # class folders reuse file names (Caltech's image_0001.jpg in each): dog/1.png, missing from the file,
    # took cat/1.png's label through the name they share, and was protected toward "cat" without a word
    from preempt_cli.errors import LabelError
    from preempt_cli.labels import read_label_file

    labels = read_label_file(_label_file(tmp_path, "cat/1.png,cat\ncat/2.png,cat\ndog/2.png,dog\n"))
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "dog").mkdir()
    for item in (InputFile(data / "dog/1.png", data), InputFile(data / "dog/1.jpg", data),
                 InputFile(data / "dog/1.png")):  # fmt: skip
        with pytest.raises(LabelError, match=r"no label for 1.* \(cat/1.png is listed, in another folder\)"):
            labels.lookup(item)
    monkeypatch.chdir(data / "dog")
    with pytest.raises(LabelError, match="no label"):  # named by its name alone, from its folder
        labels.lookup(InputFile(Path("1.png")))
    monkeypatch.chdir(data / "cat")
    assert labels.lookup(InputFile(Path("1.png"))) == "cat"
    assert labels.lookup(InputFile(data / "cat/1.jpg", data)) == "cat"  # by stem, in its own folder
    # a data set moved since its file was written (another root above the class folders) still matches
    moved = read_label_file(_label_file(tmp_path, "/home/alice/data/cat/1.png,cat\n"))
    assert moved.lookup(InputFile(tmp_path / "copy/cat/1.png")) == "cat"
    assert moved.lookup(InputFile(tmp_path / "copy/cat/1.jpg", tmp_path / "copy")) == "cat"


def test_a_csv_header_is_read_wherever_its_file_column_is(tmp_path: Path) -> None:
    # "label,file", "class,path", "id,file,label" (an index column first): the header was taken for a row,
    # each class name for a file's name, and every file failed as "no label"
    from preempt_cli.errors import LabelError
    from preempt_cli.labels import read_label_file

    item = InputFile(tmp_path / "data/cat/1.png", tmp_path / "data")
    for i, text in enumerate(("label,file\ncat,cat/1.png\n", "Class,Path\r\ncat,cat/1.png\r\n",
                              "id,file,label\n7,cat/1.png,cat\n", "file,label\ncat/1.png,cat\n")):  # fmt: skip
        path = tmp_path / f"labels{i}.csv"
        path.write_text(text)
        assert read_label_file(path).lookup(item) == "cat", text
    short = tmp_path / "short.csv"
    short.write_text("id,file,label\n7,cat/1.png\n")  # no label column in the row: not "7" labelled cat/1.png
    with pytest.raises(LabelError, match="row 1 needs two columns"):
        read_label_file(short)


def test_keys_without_an_extension_keep_their_folders(tmp_path: Path) -> None:
    # "cat/00003" (ImageNet's synset/id lists, ids without extension): unique keys were found only through the
    # stem, which the other class's file of that number shares, and failed as "ambiguous"
    from preempt_cli.labels import read_label_file

    labels = read_label_file(_label_file(tmp_path, "n01440764/val_0001,0\nn01443537/val_0001,1\n"))
    data = tmp_path / "val"
    assert labels.lookup(InputFile(data / "n01440764/val_0001.JPEG", data)) == "0"
    assert labels.lookup(InputFile(data / "n01443537/val_0001.png")) == "1"


def test_a_pattern_matching_nothing_fails_alone_and_the_other_arguments_go_on(tmp_path: Path) -> None:
    from preempt_cli.errors import ImageReadError
    from preempt_cli.imageio import read_image
    from preempt_cli.inputs import collect_inputs

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    found = collect_inputs([str(tmp_path / "a" / "*.jpg"), str(tmp_path / "b" / "*.png")])
    assert [i.path for i in found] == [tmp_path / "a" / "x.jpg", tmp_path / "b" / "*.png"]
    assert [i.unmatched_pattern for i in found] == [False, True]  # protect says "no file matches this pattern"
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(found[1].path)


def test_paths_from_stdin_one_per_line_or_nul_separated(tmp_path: Path) -> None:
    import io

    from preempt_cli.inputs import collect_inputs

    names = [" lead.png", "trail.png ", "plain.png"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    lines = f"{tmp_path}/ lead.png\n{tmp_path}/trail.png \n  {tmp_path}/plain.png  \n\n   \n"
    assert [i.path.name for i in collect_inputs(["-"], stdin=io.StringIO(lines))] == names
    nul = "\0".join(f"{tmp_path}/{n}" for n in names) + "\0"
    assert [i.path.name for i in collect_inputs(["-"], stdin=io.StringIO(nul))] == names
    assert collect_inputs(["-", str(tmp_path / "plain.png")], stdin=io.StringIO("")) != []


def test_a_line_of_a_list_on_stdin_ends_at_a_newline_alone(tmp_path: Path) -> None:
    """``ls | preempt protect -``: a name holding \\r, \\f, \\x1d, U+0085 or U+2028 (all legal in a file
    name, and where str.splitlines breaks a line) was cut in two, each part failing as "no such file".
    A CRLF list still works, its \\r dropped also where the file is missing (the error names the file)."""
    import io

    from preempt_cli.inputs import collect_inputs

    names = ["cr\rx.png", "ff\fx.png", "gs\x1dx.png", "nel\x85x.png", "ls\u2028x.png", "plain.png"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    listed = "".join(f"{tmp_path}/{n}\n" for n in names)
    assert [i.path.name for i in collect_inputs(["-"], stdin=io.StringIO(listed))] == names
    crlf = f"{tmp_path}/plain.png\r\n{tmp_path}/gone.png\r\n"
    assert [i.path.name for i in collect_inputs(["-"], stdin=io.StringIO(crlf))] == ["plain.png", "gone.png"]


def test_a_byte_order_mark_before_a_list_on_stdin_is_no_part_of_its_first_name(tmp_path: Path) -> None:
    """A list saved by Notepad or PowerShell starts with U+FEFF: its first file failed as "no such file",
    the mark invisible in the error. It is dropped, unless a file's name does start with it."""
    import io

    from preempt_cli.inputs import collect_inputs

    for n in ("plain.png", "b.png"):
        (tmp_path / n).write_bytes(b"x")
    for sep in ("\r\n", "\0"):
        listed = f"\ufeff{tmp_path}/plain.png{sep}{tmp_path}/b.png{sep}"
        assert [i.path for i in collect_inputs(["-"], stdin=io.StringIO(listed))] == [tmp_path / "plain.png",
                                                                                        tmp_path / "b.png"]
    (tmp_path / "\ufeffodd.png").write_bytes(b"x")  # a name that does start with one: taken as it is
    listed = f"{tmp_path}/\ufeffodd.png\n"
    assert [i.path.name for i in collect_inputs(["-"], stdin=io.StringIO(listed))] == ["\ufeffodd.png"]


def test_a_path_listed_on_stdin_is_never_a_pattern(tmp_path: Path) -> None:
    """``find ... -print0 | preempt protect -0 -``: a listed file named ``q?.png``, gone since, was taken
    as a pattern and replaced unseen by ``qq.png`` (exit 0); a listed ``*1*.png`` expanded to two files.
    Listed paths are taken as they are, and a missing one fails as missing; arguments still expand."""
    import io

    from preempt_cli.inputs import collect_inputs

    for name in ("qq.png", "a1.png", "b1.png"):
        (tmp_path / name).write_bytes(b"x")
    listed = f"{tmp_path}/q?.png\0{tmp_path}/*1*.png\0"
    found = collect_inputs(["-"], stdin=io.StringIO(listed))
    assert [i.path for i in found] == [tmp_path / "q?.png", tmp_path / "*1*.png"]
    assert not any(i.path.exists() for i in found)  # each fails as missing when read
    assert [i.path.name for i in collect_inputs([f"{tmp_path}/*1*.png"])] == ["a1.png", "b1.png"]
    (tmp_path / "-").write_bytes(b"x")  # a file named "-", listed: that file, not stdin again
    assert [i.path.name for i in collect_inputs(["-"], stdin=io.StringIO(f"{tmp_path}/-\n"))] == ["-"]


@pytest.mark.parametrize(
    "path, root",
    [("photos/a/b.png", "photos"), ("b.png", "."), ("/data/x/y/z.png", "/data"), ("/z.png", "/"),
     ("photos/./a/b.png", "photos"), ("other/b.png", None)],
)  # fmt: skip
def test_relative_and_output_paths_are_what_pathlib_gives(path: str, root: str | None) -> None:
    # relative and output names are built from strings (pathlib is slow on Python 3.12); they must be what
    # pathlib's relative_to and joins give
    item = InputFile(Path(path), Path(root) if root is not None else None)
    expected = Path(path).relative_to(root) if root is not None else Path(Path(path).name)
    assert item.relative == expected
    for out_dir in (None, Path("out"), Path("/abs/out")):
        for several in (False, True):
            got = output_path(item, suffix=".protected", out_dir=out_dir, under_root_name=several)
            if out_dir is None:
                want = Path(path).parent / f"{Path(path).stem}.protected.png"
            else:
                folder = expected.parent
                if several and root is not None:
                    folder = Path(os.path.abspath(root)).name / folder
                want = out_dir / folder / f"{Path(path).stem}.protected.png"
            assert got == want, (out_dir, several)



def test_an_empty_folder_given_beside_another_counts_for_output_names(tmp_path: Path) -> None:
    """Two folders given, one without images yet: the other's outputs go under its name (as with both
    filled), so they stay where they are once the empty one gets images (a re-run finds them)."""
    import io

    from preempt_cli.inputs import collect_inputs

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "b").mkdir()
    out = tmp_path / "out"

    def named(*args: str, stdin: str = "") -> dict[str, Path | str]:
        paths = [a if a == "-" else str(tmp_path / a) for a in args]
        return _outputs(collect_inputs(paths, stdin=io.StringIO(stdin)), out_dir=out)

    expected = out / "a" / "x.protected.png"
    assert named("a", "b") == {str(tmp_path / "a" / "x.png"): expected}
    assert named("a", "-", stdin=f"{tmp_path / 'b'}\n") == {str(tmp_path / "a" / "x.png"): expected}  # listed
    (tmp_path / "b" / "y.png").write_bytes(b"")
    assert named("a", "b")[str(tmp_path / "a" / "x.png")] == expected
    # one folder (given twice, or alone): its tree is mirrored in out/ itself
    assert named("a", "a") == named("a") == {str(tmp_path / "a" / "x.png"): out / "x.protected.png"}


def test_a_broken_symlink_in_a_folder_fails_with_its_reason_not_silently(tmp_path: Path) -> None:
    from preempt_cli.errors import ImageReadError
    from preempt_cli.imageio import read_image
    from preempt_cli.inputs import collect_inputs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"")
    (tmp_path / "in" / "gone.png").symlink_to(tmp_path / "in" / "deleted.png")
    (tmp_path / "in" / "loop.png").symlink_to("loop.png")
    (tmp_path / "in" / "notes.txt").symlink_to("deleted.txt")  # not an image's name: left out, as any .txt
    (tmp_path / "in" / ".hidden.png").symlink_to("deleted.png")  # hidden: left out, as any hidden entry
    found = collect_inputs([tmp_path / "in"])
    assert [i.path.name for i in found] == ["gone.png", "loop.png", "x.png"]
    with pytest.raises(ImageReadError, match="broken symbolic link: its target .*deleted.png does not exist"):
        read_image(found[0].path)
    with pytest.raises(ImageReadError, match="cannot read: Too many levels of symbolic links"):
        read_image(found[1].path)


def test_one_file_under_several_names_keeps_the_real_name(tmp_path: Path) -> None:
    from preempt_cli.inputs import collect_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("real.png", "z.png"):
        (folder / name).write_bytes(b"")
    (folder / "link.png").symlink_to("real.png")  # sorts before its target
    (folder / "a_link.png").symlink_to("link.png")  # a link to the link
    (folder / "zz.png").symlink_to("z.png")  # sorts after its target
    names = [i.path.name for i in collect_inputs([folder])]
    assert names == ["real.png", "z.png"]
    # named directly too; otherwise the first occurrence still wins, in its own place
    assert [i.path.name for i in collect_inputs([folder / "link.png", folder / "z.png", folder / "real.png"])] == [
        "z.png", "real.png"]  # fmt: skip
    assert [i.path.name for i in collect_inputs([folder / "link.png", folder / "a_link.png"])] == ["link.png"]
    assert [i.path.name for i in collect_inputs([folder / "z.png", folder, folder / "z.png"])] == ["z.png", "real.png"]
    # only links to one file: the first one, as before
    (folder / "real.png").unlink()
    (folder / "z.png").unlink()
    (tmp_path / "elsewhere.png").write_bytes(b"")
    (folder / "b.png").symlink_to(tmp_path / "elsewhere.png")
    (folder / "c.png").symlink_to(tmp_path / "elsewhere.png")
    assert [i.path.name for i in collect_inputs([folder]) if i.path.exists()] == ["b.png"]


def _preempt_png(path: Path) -> Path:
    """A PNG carrying preempt's metadata chunk, as an earlier run's output does."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("preempt", "{}")
    Image.new("RGB", (2, 2)).save(path, pnginfo=info)
    return path


def test_an_output_that_is_another_input_of_the_run_is_refused_unless_it_is_an_earlier_output(tmp_path: Path) -> None:
    """``protect a.png a.protected.png --overwrite``, a.protected.png a user's original: the run replaced it."""
    from preempt_cli.inputs import collect_inputs

    (tmp_path / "a.png").write_bytes(b"cat")
    (tmp_path / "a.protected.png").write_bytes(b"dog")
    out = _outputs(collect_inputs([tmp_path / "a.png", tmp_path / "a.protected.png"]))
    reason = out[str(tmp_path / "a.png")]
    assert isinstance(reason, str) and f"would replace input {tmp_path / 'a.protected.png'}" in reason
    assert out[str(tmp_path / "a.protected.png")] == tmp_path / "a.protected.protected.png"
    # named through a linked folder, the same file
    (tmp_path / "link").symlink_to(tmp_path)
    out = _outputs(collect_inputs([tmp_path / "a.png", tmp_path / "link" / "a.protected.png"]))
    assert "would replace input" in out[str(tmp_path / "a.png")]
    # into an --out-dir that holds an input
    out = _outputs(collect_inputs([tmp_path / "a.png", tmp_path / "a.protected.png"]), out_dir=tmp_path)
    assert "would replace input" in out[str(tmp_path / "a.png")]
    # an earlier run's output named beside its original (a shell glob after a run): re-runs judge it
    _preempt_png(tmp_path / "a.protected.png")
    out = _outputs(collect_inputs([tmp_path / "a.png", tmp_path / "a.protected.png"]))
    assert out[str(tmp_path / "a.png")] == tmp_path / "a.protected.png"
    # the input itself, through a linked folder
    out = assign_outputs(collect_inputs([tmp_path / "link" / "a.png"]), suffix="", out_dir=tmp_path)
    assert "would replace the input" in next(iter(out.values()))
    # an input that is a link to another input's output (the user's photo behind it), or to its own output
    (tmp_path / "a.protected.png").write_bytes(b"dog")
    (tmp_path / "dog.png").symlink_to(tmp_path / "a.protected.png")
    out = _outputs(collect_inputs([tmp_path / "a.png", tmp_path / "dog.png"]))
    assert f"would replace input {tmp_path / 'dog.png'}" in out[str(tmp_path / "a.png")]
    (tmp_path / "b.protected.png").write_bytes(b"owl")
    (tmp_path / "b.png").symlink_to(tmp_path / "b.protected.png")
    assert "would replace the input" in _outputs(collect_inputs([tmp_path / "b.png"]))[str(tmp_path / "b.png")]


def test_one_path_given_as_a_string_is_one_path_not_its_characters(tmp_path: Path, monkeypatch) -> None:
    from preempt_cli.inputs import as_input_files, collect_inputs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert [i.path for i in collect_inputs("in")] == [Path("in/x.png")]
    assert [i.path for i in collect_inputs(tmp_path / "in")] == [tmp_path / "in" / "x.png"]
    # what Protector.run takes: inputs as they are, paths expanded, nothing stays nothing
    items = collect_inputs("in")
    assert as_input_files(items) == items == as_input_files(["in"]) == as_input_files("in")
    assert as_input_files([]) == []
    with pytest.raises(TypeError, match="not both"):
        as_input_files([*items, "in"])


def _tree(root: Path) -> list[Path]:
    """An ImageFolder tree of 24 empty files in 3 class folders."""
    files = []
    for name in ("airplane", "bird", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            files.append(root / name / f"{i:05d}.png")
            files[-1].write_bytes(b"")
    return files


def test_shards_split_the_same_outputs_alike_however_the_inputs_are_named(tmp_path: Path, monkeypatch) -> None:
    """``protect src -o D --shard 1/2`` + ``protect src/* -o D --shard 2/2`` covered 18 of 24 files, and
    relative + absolute lists on stdin 19 of 24: the key was the path as typed, or under the folder given."""
    import io

    from preempt_cli.inputs import collect_inputs, in_shard

    work = tmp_path / "work"
    files = _tree(work / "src")
    monkeypatch.chdir(work)
    relative = "".join(f"{f.relative_to(work)}\n" for f in files)
    absolute = "".join(f"{f}\n" for f in reversed(files))
    ways = {  # each: the arguments, and stdin
        "src": (["src"], ""), "./src/": (["./src/"], ""), "absolute": ([str(work / "src")], ""),
        "src/*": (sorted(str(p) for p in Path("src").glob("*")), ""),
        "children reversed": (sorted((str(p) for p in Path("src").glob("*")), reverse=True), ""),
        "stdin relative": (["-"], relative), "stdin absolute": (["-"], absolute),
    }  # fmt: skip

    def shard(args: list[str], stdin: str, out_dir: Path | None, k: int) -> set[Path]:
        items = collect_inputs(args, stdin=io.StringIO(stdin))
        outputs = assign_outputs(items, suffix=".protected", out_dir=out_dir)
        return {i.path.resolve() for i in items if in_shard(i, (k, 2), outputs[i], out_dir)}

    # in place: every way names the same outputs
    for k in (1, 2):
        parts = {name: shard(args, stdin, None, k) for name, (args, stdin) in ways.items()}
        assert len({frozenset(p) for p in parts.values()}) == 1, parts
    first = shard(["src"], "", None, 1)
    assert 0 < len(first) < 24 and first | shard(["-"], absolute, None, 2) == set(files)
    # with --out-dir: a folder and its subfolders mirror the same tree; given relative or absolute, and from
    # another place (../..), the out-dir is the same folder
    (work / "a" / "b").mkdir(parents=True)
    one = shard(["src"], "", Path("D"), 1)
    monkeypatch.chdir(work / "a" / "b")
    other = shard(sorted(str(p) for p in Path("../../src").glob("*")), "", work / "D", 2)
    assert one | other == set(files) and not one & other

    # a job array whose tasks copy the data to their own disk (or see it mounted elsewhere): each task's
    # files are another path, the same outputs under it (they split anew by absolute path: 20 of 24, 5 twice)
    monkeypatch.chdir(tmp_path)
    for node in ("node1", "node2"):
        _tree(tmp_path / node / "src")
    for out_dir in (None, "D"):
        parts = [{f.relative_to(tmp_path / node) for f in shard([str(tmp_path / node / "src")], "",
                                                                  out_dir and tmp_path / node / out_dir, k)}
                 for k, node in ((1, "node1"), (2, "node2"))]  # fmt: skip
        assert parts[0] | parts[1] == {f.relative_to(work) for f in files} and not parts[0] & parts[1], out_dir


def test_a_stem_shared_on_disk_keeps_the_extension_whichever_files_a_run_is_given(tmp_path: Path) -> None:
    """``ls | xargs -n1 preempt protect`` named same.jpg's output same.protected.png, then same.png failed
    ("made from other content"), while ``preempt protect .`` wrote same.jpg.protected.png."""
    for name in ("same.jpg", "same.PNG", "alone.png", "notes.txt", "alone.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "alone.jpg").mkdir()  # a folder, not an image beside alone.png
    assert _outputs([InputFile(tmp_path / "same.jpg")]) == {str(tmp_path / "same.jpg"): tmp_path / "same.jpg.protected.png"}
    assert _outputs([InputFile(tmp_path / "same.PNG", tmp_path)], out_dir=tmp_path / "o") == {
        str(tmp_path / "same.PNG"): tmp_path / "o" / "same.PNG.protected.png"}  # fmt: skip
    assert _outputs([InputFile(tmp_path / "alone.png")]) == {str(tmp_path / "alone.png"): tmp_path / "alone.protected.png"}


def test_an_output_beside_the_originals_does_not_rename_another_original_s_output(tmp_path: Path) -> None:
    """``z.jpeg``'s output ``z.protected.png`` shares a stem with the original ``z.protected.tif``: counted as
    an image beside it, it made a re-run name that file's output ``z.protected.tif.protected.png`` where the
    first run had written ``z.protected.protected.png``, and protect it again, into a second output."""
    for name in ("z.jpeg", "z.protected.tif"):
        (tmp_path / name).write_bytes(b"")
    items = [InputFile(tmp_path / "z.jpeg", tmp_path), InputFile(tmp_path / "z.protected.tif", tmp_path)]
    first = _outputs(items)
    assert first == {str(tmp_path / "z.jpeg"): tmp_path / "z.protected.png",
                     str(tmp_path / "z.protected.tif"): tmp_path / "z.protected.protected.png"}  # fmt: skip
    for output in first.values():
        Path(output).write_bytes(b"")  # the first run's outputs
    assert _outputs(items) == first


def test_a_link_to_a_folder_is_not_followed_and_is_logged(tmp_path: Path) -> None:
    import logging

    from preempt_cli.inputs import collect_inputs

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "x.png").write_bytes(b"")
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in")
    (tmp_path / "in" / ".hidden").symlink_to(tmp_path / "in")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("preempt_cli.inputs")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert [i.path for i in collect_inputs([tmp_path / "in"])] == [tmp_path / "in" / "sub" / "x.png"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records] == [f"{tmp_path / 'in' / 'loop'}: a link to a folder, not followed "
                                                 f"(name it to include its images)"]  # fmt: skip


def test_folder_walks_take_jfif_avif_and_jpeg_2000(tmp_path: Path) -> None:
    """A folder holding only photo.jfif and x.avif exited 2 with "no images found", though Pillow reads
    both when they are named directly."""
    from preempt_cli.inputs import collect_inputs

    for name in ("photo.jfif", "x.avif", "scan.jp2", "scan2.j2k", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(i.path.name for i in collect_inputs([tmp_path])) == ["photo.jfif", "scan.jp2", "scan2.j2k",
                                                                         "x.avif"]  # fmt: skip


def test_folder_walk_leaves_out_hidden_entries_and_macos_resource_forks(tmp_path: Path) -> None:
    """Protect walks a folder as train reads a set: hidden entries and macOS's __MACOSX folder (an unzipped
    archive's resource forks) are left out, by one rule (inputs.is_hidden_name)."""
    from preempt_cli.inputs import collect_inputs

    for rel in ["cat/a.png", "cat/.b.png", ".cache/c.png", "__MACOSX/cat/._a.png", "__MACOSX/cat/a.png", "x__MACOSX/d.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = collect_inputs([tmp_path])
    assert sorted(i.path.relative_to(tmp_path).as_posix() for i in found) == ["cat/a.png", "x__MACOSX/d.png"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux's /proc")
def test_an_input_in_a_kernel_folder_gets_no_output_beside_it(tmp_path: Path) -> None:
    """``<(cmd)`` is /dev/fd/63, a link into /proc; /dev/stdin is in /dev: nothing can be written beside
    them (root could litter /dev), so they are refused before the work, with the way out."""
    read_end, write_end = os.pipe()
    try:
        pipe = Path(f"/dev/fd/{read_end}")
        out = _outputs([InputFile(pipe), InputFile(Path("/dev/stdin")), InputFile(tmp_path / "a.png")])
        assert out[str(pipe)] == "no folder to write the output beside (/proc is the kernel's): give --out-dir"
        assert out["/dev/stdin"] == "no folder to write the output beside (/dev is the kernel's): give --out-dir"
        assert out[str(tmp_path / "a.png")] == tmp_path / "a.protected.png"
        assert _outputs([InputFile(pipe)], out_dir=tmp_path)[str(pipe)] == tmp_path / f"{read_end}.protected.png"
    finally:
        os.close(read_end)
        os.close(write_end)
    assert [kernel_folder(p) for p in ("/proc/self", "/sys", "/dev/null", "/dev/shm/x", "/devices", str(tmp_path))] == [
        "/proc", "/sys", "/dev", None, None, None]


def test_paths_as_bytes_are_paths(tmp_path: Path) -> None:
    """``run([b"photos"])`` said "no such file" for a folder there (``str(b"...")``), and ``run(b"photos")``
    raised a TypeError: bytes are a name as the OS gives it."""
    from preempt_cli.inputs import collect_inputs

    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(b"")
    expected = collect_inputs([tmp_path / "in"])
    assert len(expected) == 2
    assert collect_inputs(os.fsencode(tmp_path / "in")) == expected
    assert collect_inputs([os.fsencode(tmp_path / "in")]) == expected


def test_a_list_is_told_from_an_image_by_more_than_its_first_letters(tmp_path: Path, monkeypatch) -> None:
    """Only bytes that start an image, and a first line that names no file, make image data: a list of
    /images/WEBP/... (WebP needs RIFF first), or whose first line ends in \\r, is a list."""
    from preempt_cli.errors import ConfigError
    from preempt_cli.inputs import path_list_text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "GIF89a.png").write_bytes(b"")
    for listing in (b"GIF89a.png\r\nb.png\r\n", b"/images/WEBP/gone.webp\n"):
        assert path_list_text(listing) == listing.decode()
    for image in (b"GIF89a\x20\x00\x20\x00rest", b"RIFF\x10\x00\x00\x00WEBPVP8 "):
        with pytest.raises(ConfigError, match="image data, not a list of paths"):
            path_list_text(image)


@pytest.mark.parametrize("fmt, name", [("PPM", "PPM"), ("TGA", "TGA"), ("ICO", "ICO"), ("SGI", "SGI"), ("PCX", "PCX")])
def test_images_without_a_signature_of_their_own_are_no_list_either(fmt: str, name: str) -> None:
    # they were taken for lists: a PPM's binary lines became four nonsense names, an ICO's 46, failing one by one
    import io

    from PIL import Image

    from preempt_cli.errors import ConfigError
    from preempt_cli.inputs import path_list_text

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format=fmt)
    with pytest.raises(ConfigError, match=f"stdin holds {name} image data, not a list of paths"):
        path_list_text(buffer.getvalue())
    assert path_list_text(b"a.ppm\nb.tga\n") == "a.ppm\nb.tga\n"  # a plain list stays one


def test_folder_walks_take_every_image_format_pillow_reads_by_its_usual_suffix(tmp_path: Path) -> None:
    # README: "anything Pillow reads"; a folder holding only an .sgi was "no images found"
    from PIL import Image

    from preempt_cli.inputs import collect_inputs

    image = Image.new("RGB", (8, 8))
    formats = {".sgi": "SGI", ".ico": "ICO", ".pcx": "PCX", ".pnm": "PPM", ".qoi": "QOI", ".dib": "BMP"}
    formats = {suffix: fmt for suffix, fmt in formats.items() if fmt in Image.SAVE}  # QOI: Pillow >= 11.3
    for suffix, fmt in formats.items():
        image.save(tmp_path / f"a{suffix}", format=fmt)
    (tmp_path / "texture.rgb").write_bytes(bytes(3072))  # a raw pixel dump by SGI's other name: left out
    assert sorted(i.path.suffix for i in collect_inputs([tmp_path])) == sorted(formats)
