"""What reaches the terminal: strings the user's files hold (a registry's names and descriptions, a PNG's
metadata, file names) come out escaped and bounded, never as escape codes, rich markup or a megabyte."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image, PngImagePlugin
from rich.console import Console
from typer.testing import CliRunner

from preempt_cli.cli import _common, app
from preempt_cli.protect import METADATA_KEY, differing_settings

#: A model name that would colour the terminal red, clear it (CSI as the C1 byte), ring, return and
#: start a new line, and that holds rich markup.
EVIL_NAME = "evil\x1b[31mRED\x9b2J[bold]B[/bold]\x07x\ry\nz"
#: Control characters none of the output may hold (a line's own end aside).
CONTROLS = ("\x1b", "\x9b", "\x07", "\r")


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string (\uXXXX escapes included)


@pytest.fixture()
def evil_registry(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(f"""
[models.{_toml_string(EVIL_NAME)}]
arch = "cifar_resnet20"
source = {_toml_string("file:w" + chr(0x1B) + "]8;;http://x" + chr(7) + "link.safetensors")}
description = {_toml_string("d" + chr(0x1B) + "[2Jclear [link=http://evil]click[/link]")}
notes = {_toml_string("n" + chr(0x9B) + "31m")}
classes = "cifar10"
""")
    return path


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _the_evil_row(text: str) -> list[str]:
    return [line for line in text.splitlines() if "evil" in line]


def test_models_list_escapes_registry_strings_and_reads_no_markup_in_them(evil_registry: Path) -> None:
    result = _invoke(["models", "list", "--verbose", "--registry", str(evil_registry)])  # to a pipe
    assert result.exit_code == 0, result.output
    assert not any(ch in result.stdout for ch in CONTROLS)
    row = _the_evil_row(result.stdout)
    assert len(row) == 1  # the newline of the name did not split its row
    assert "evil\\x1b[31mRED\\x9b2J[bold]B[/bold]\\x07x\\ry\\nz" in row[0]  # escaped, its brackets as written
    assert "w\\x1b]8;;http://x\\x07link.safetensors" in row[0]


def test_models_list_on_a_terminal_escapes_registry_strings(evil_registry: Path, monkeypatch) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=400, soft_wrap=True, highlight=False)
    monkeypatch.setattr(_common, "stdout", terminal)
    assert _invoke(["models", "list", "--registry", str(evil_registry)]).exit_code == 0
    shown = terminal.file.getvalue()
    # rich's own codes (the bold header) aside, none of the registry's: no red, no hyperlink, no C1 CSI
    assert "\x1b[31m" not in shown and "\x1b]8;" not in shown and "\x9b" not in shown and "\x07" not in shown
    assert "[bold]B[/bold]" in shown and "\\x1b[31mRED" in shown


def test_models_show_escapes_registry_strings(evil_registry: Path) -> None:
    result = _invoke(["models", "show", EVIL_NAME, "--registry", str(evil_registry)])
    assert result.exit_code == 0, result.output
    assert not any(ch in result.stdout for ch in CONTROLS)
    lines = result.stdout.splitlines()
    assert lines[0] == "name         evil\\x1b[31mRED\\x9b2J[bold]B[/bold]\\x07x\\ry\\nz"  # one line, as written
    assert "description  d\\x1b[2Jclear [link=http://evil]click[/link]" in lines
    assert "notes        n\\x9b31m" in lines


def test_models_json_keeps_registry_strings_whole_and_escaped(evil_registry: Path) -> None:
    result = _invoke(["models", "list", "--json", "--registry", str(evil_registry)])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert EVIL_NAME in [row["name"] for row in rows]  # whole, for a program
    assert not any(ch in result.stdout for ch in (*CONTROLS, "\x9b"))  # json.dumps escapes them


def test_notes_escape_the_file_names_they_hold(evil_registry: Path, tmp_path: Path) -> None:
    named = tmp_path / "reg\x1b[31m.toml"
    named.write_bytes(evil_registry.read_bytes())
    result = _invoke(["models", "list", "--registry", str(named)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stderr and "reg\\x1b[31m.toml" in result.stderr


def test_convert_quiet_quotes_its_output_name_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "ckpt.pt")
    out = tmp_path / "o\x1b[31m.safetensors"
    monkeypatch.setattr(_common, "stdout_is_terminal", lambda: True)
    result = _invoke(["models", "convert", str(tmp_path / "ckpt.pt"), str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"$'{tmp_path}/o\\E[31m.safetensors'\n"


def test_eval_tables_escape_model_names_and_read_no_markup_in_them(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from conftest import TEST_DEVICE_ARG, write_random_pngs
    from preempt_cli.models import create_arch

    write_random_pngs(tmp_path / "data" / "cat", n=2)
    torch.manual_seed(0)
    net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    victim = "v[bold]B[/bold]\x1b[31m"
    (tmp_path / "models.toml").write_text(f'[models.{_toml_string(victim)}]\narch = "cifar_resnet20"\n'
                                          'arch_args = { shortcut = "pad_end" }\nclasses = "cifar10"\n'
                                          'source = "file:w.safetensors"\n')  # fmt: skip
    result = _invoke(["eval", str(tmp_path / "data"), "--victim", victim, "--defense", "none", "--attack",
                      "pgd:steps=1", "--out", str(tmp_path / "o"), "--device", TEST_DEVICE_ARG,
                      "--registry", str(tmp_path / "models.toml")])  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if "PGD" in line]
    assert row.split()[0] == "v[bold]B[/bold]\\x1b[31m" and "\x1b" not in result.stdout


# -- metadata of an edited PNG -----------------------------------------------------------------------------------

#: A recorded model name of a megabyte, ending in an escape code.
HUGE_NAME = "x" * 1_000_000 + "\x1b[31m"


def _protected_png(path: Path, **recorded) -> Path:
    meta = {"kind": "protected", "backbone": "tiny", "eps": 8 / 255, "eta": 1 / 255, "forward_steps": 1,
            "backward_steps": 1, "samples": 1, "sample_projection": "original", "inner_steps": 1, "seed": 0,
            **recorded}  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("json_out", [False, True])
def test_a_white_box_reversion_shows_a_recorded_model_name_cut_and_escaped(tmp_path: Path, json_out: bool) -> None:
    png = _protected_png(tmp_path / "a.protected.png", backbone=HUGE_NAME)
    result = _invoke(["revert", "--white-box", str(png), "--device", "cpu", "-o", str(tmp_path / "out"),
                      *(["--json"] if json_out else [])])  # fmt: skip
    assert result.exit_code == 1
    said = json.loads(result.stdout)["reason"] if json_out else result.stderr
    assert len(said) < 1000 and "\x1b" not in said
    assert f"unknown model {'x' * 80!r}… (1,000,005 characters)" in said


def test_a_recorded_setting_of_an_earlier_output_is_shown_cut() -> None:
    changed = differing_settings({"backbone": HUGE_NAME, "seed": 0}, {"backbone": "tiny-key", "seed": 0})
    assert changed == [f"backbone {'x' * 80!r}… (1,000,005 characters) -> tiny-key"]


def test_excerpt_and_value_text_cut_long_values_and_escape_control_characters() -> None:
    from preempt_cli.errors import excerpt, value_text

    assert excerpt("tiny-key") == "'tiny-key'" and value_text("tiny-key") == "tiny-key" and value_text(None) == "None"
    assert excerpt("a\x1b[31m") == value_text("a\x1b[31m") == "'a\\x1b[31m'"
    assert excerpt("é" * 81) == f"{'é' * 80!r}… (81 characters)"
    assert excerpt(list(range(100))).endswith("… (390 characters)") and len(excerpt(list(range(100)))) < 110


# -- standalone_mode=False -------------------------------------------------------------------------------------


def test_a_usage_error_of_a_caller_in_python_is_logged_with_the_exit_code_of_the_command_line(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with pytest.raises(Exception) as raised:  # Click's usage error, for the caller to handle
        app(["models", "show", "--log", str(log)], standalone_mode=False)
    assert raised.value.exit_code == 2
    lines = [line.split(": ", 1)[1] for line in log.read_text().splitlines()]
    assert lines[-2].startswith("Missing argument 'NAME'") and "Traceback" not in log.read_text()
    assert lines[-1].startswith("exit code 2 (usage, setup or internal error) after ")


def test_a_usage_error_escapes_what_was_typed(capsys) -> None:
    from preempt_cli.cli import _usage_error_line

    # Click 8.1 quotes an unknown option as it was typed (typer 0.29's own copy escapes it)
    _usage_error_line(typer.BadParameter("No such option: --\x1b[31mx"))
    assert capsys.readouterr().err == "error: Invalid value: No such option: --\\x1b[31mx\n"


def test_an_error_line_cuts_a_long_reason_and_keeps_what_it_names(capsys) -> None:
    """An ``error:`` line had no bound: an exception's message of 10 kB (a decoder's, a value in it) went
    whole to the terminal and the log. Its reason is cut to its first ``ERROR_REASON_CHARS`` characters (as
    escaped), the cut marked ``…`` with the reason's length; the name of the file it is about, and a hint
    after it, are said whole."""
    long_name = "/photos/" + "n" * 2000 + ".png"
    _common.error_line("cannot decode: " + "x" * 10_000)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: cannot decode: xxx") and line.endswith("x… (10,015 characters)")
    assert len(line) <= len("error: ") + _common.ERROR_REASON_CHARS + len("… (10,015 characters)")
    _common.error_line("bad\x1b[31m" * 2000, head=long_name, tail="set PREEMPT_DEBUG=1 for the traceback")
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {long_name}: bad\\x1b[31mbad") and "\x1b" not in line
    assert line.endswith("… (16,000 characters) (set PREEMPT_DEBUG=1 for the traceback)")
    reason = line[len(f"error: {long_name}: ") : -len("… (16,000 characters) (set PREEMPT_DEBUG=1 for the traceback)")]
    assert _common.ERROR_REASON_CHARS - 4 < len(reason) <= _common.ERROR_REASON_CHARS
    assert _common.one_line("bad\x1b[31m" * 2000).startswith(reason) and reason.count("\\x") == reason.count("\\x1b")
    _common.error_line("short: as it was")  # a short line is unchanged
    assert capsys.readouterr().err == "error: short: as it was\n"


def test_a_label_file_error_quotes_its_contents_cut(tmp_path: Path) -> None:
    from preempt_cli.errors import LabelError
    from preempt_cli.labels import read_label_file

    labels = tmp_path / "labels.csv"
    labels.write_text(f"a.png,cat\na.png,{'d' * 100_000}\n")
    with pytest.raises(LabelError) as raised:
        read_label_file(labels)
    assert str(raised.value) == (f"{labels}: row 2 gives a.png the label {'d' * 80!r}… (100,000 characters), an "
                                 "earlier row 'cat'")  # fmt: skip


def test_a_label_file_with_a_field_past_the_csv_limit_is_a_label_error(tmp_path: Path) -> None:
    from preempt_cli.errors import LabelError
    from preempt_cli.labels import read_label_file

    labels = tmp_path / "labels.csv"
    labels.write_text(f"a.png,{'d' * 200_000}\n")  # csv refuses a field over 128 KiB: it was an internal error
    with pytest.raises(LabelError, match=r"labels.csv: not valid CSV \(field larger than field limit"):
        read_label_file(labels)
