"""The ``preempt`` command end to end, on tiny models registered in a temporary registry."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TEST_DEVICE, TEST_DEVICE_ARG, QueuedWork, StandInDevice, interrupt_run_once, write_random_pngs
from preempt_cli import __version__
from preempt_cli.cli import app
from preempt_cli.errors import ConfigError
from preempt_cli.imageio import levels_to_float
from preempt_cli.inputs import collect_inputs, parse_shard, read_failure
from preempt_cli.models import create_arch
from preempt_cli.protect import RunOptions

EPS_LEVELS = 8


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with two small random-weight models (a backbone and a classifier) in local files."""
    root = tmp_path_factory.mktemp("registry")
    for i, name in enumerate(("key", "labeller")):
        torch.manual_seed(i)
        net = create_arch("cifar_resnet20", num_classes=10, shortcut="pad_end")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / f"{name}.safetensors"))
    sha = hashlib.sha256((root / "key.safetensors").read_bytes()).hexdigest()
    (root / "models.toml").write_text(
        f"""
[models.tiny-key]
arch = "cifar_resnet20"
arch_args = {{ shortcut = "pad_end" }}
classes = "cifar10"
source = "file:key.safetensors"
sha256 = "{sha}"
role = "backbone"

[models.tiny-labeller]
base = "tiny-key"
source = "file:labeller.safetensors"
sha256 = "{"0" * 64}"
role = "classifier"

[models.tiny-labeller-unpinned]
base = "tiny-key"
source = "labeller.safetensors"
sha256 = "{hashlib.sha256((root / "labeller.safetensors").read_bytes()).hexdigest()}"
"""
    )
    return root / "models.toml"


_images = write_random_pngs


def _digest(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def run(args: list[str], registry: Path, **kw) -> "CliRunner.invoke":
    runner = CliRunner()
    return runner.invoke(app, [*args, "--registry", str(registry)], catch_exceptions=False, **kw)


FAST = ["--samples", "3", "-b", "tiny-key", "--device", TEST_DEVICE_ARG]


def test_protect_folder_writes_budgeted_pngs_and_keeps_originals(tmp_path: Path, registry: Path) -> None:
    originals = _images(tmp_path / "photos")
    before = _digest(originals)
    result = run(["protect", str(tmp_path / "photos"), *FAST, "-c", "tiny-labeller-unpinned", "--json"], registry)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {Path(r["input"]) for r in lines} == set(originals)
    assert _digest(originals) == before  # originals untouched
    for r in lines:
        assert r["status"] == "done"
        out = Path(r["output"])
        assert out.name.endswith(".protected.png")
        a = np.asarray(Image.open(r["input"]), dtype=np.int64)
        b = np.asarray(Image.open(out), dtype=np.int64)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= EPS_LEVELS
        assert np.abs(a - b).max() == r["linf_levels"]
        meta = json.loads(Image.open(out).text["preempt"])
        assert meta["backbone"] == "tiny-key" and meta["classifier"] == "tiny-labeller-unpinned"
        assert len(meta["backbone_sha256"]) == 64
        assert meta["eps"] == pytest.approx(8 / 255) and meta["samples"] == 3 and meta["eta"] == 0.7
        assert (meta["forward_steps"], meta["backward_steps"], meta["seed"]) == (1, 2, 0)
    assert not list((tmp_path / "photos").glob(".*tmp"))  # no temp files left behind


def test_rerun_skips_and_overwrite_redoes(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "p", n=2)
    assert run(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    again = run(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone", "--json"], registry)
    assert again.exit_code == 0
    assert [json.loads(x)["status"] for x in again.stdout.splitlines()] == ["skipped", "skipped"]
    # An output named directly is recognised as already protected.
    out = tmp_path / "p" / "img0.protected.png"
    direct = run(["protect", str(out), *FAST, "--labels", "backbone", "--json"], registry)
    assert json.loads(direct.stdout)["status"] == "skipped"
    # with no output: it named img0.protected.protected.png, which does not exist, as if it did
    assert "output" not in json.loads(direct.stdout)
    # ... by its metadata, not its name alone: a photo of the user's so named is an original
    mine = tmp_path / "mine" / "holiday.protected.png"
    mine.parent.mkdir()
    mine.write_bytes((tmp_path / "p" / "img0.png").read_bytes())
    named = run(["protect", str(mine), *FAST, "--labels", "backbone", "--json"], registry)
    assert named.exit_code == 0 and json.loads(named.stdout)["status"] == "done"
    assert (mine.parent / "holiday.protected.protected.png").is_file()
    redo = run(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone", "--json", "--overwrite"], registry)
    assert [json.loads(x)["status"] for x in redo.stdout.splitlines()] == ["done", "done"]


def test_an_edited_original_or_another_file_of_the_same_name_is_not_skipped_as_done(tmp_path: Path,
                                                                                   registry: Path) -> None:  # fmt: skip
    a, b = _images(tmp_path / "cams/a", n=1)[0], _images(tmp_path / "cams/b", n=1, seed=7)[0]
    assert a.name == b.name
    out = tmp_path / "out"
    # the same name twice into one flat --out-dir: both refused, nothing written in their place
    both = run(["protect", str(a), str(b), "-o", str(out), *FAST, "--labels", "backbone", "--json"], registry)
    assert both.exit_code == 1
    assert [json.loads(x)["status"] for x in both.stdout.splitlines()] == ["failed", "failed"]
    assert "would also be written for" in both.stderr and not (out / "img0.protected.png").exists()
    # one after the other: the second run must not take the first one's output for its own
    assert run(["protect", str(a), "-o", str(out), *FAST, "--labels", "backbone"], registry).exit_code == 0
    made = (out / "img0.protected.png").read_bytes()
    second = run(["protect", str(b), "-o", str(out), *FAST, "--labels", "backbone", "--json"], registry)
    assert second.exit_code == 1 and json.loads(second.stdout)["status"] == "failed"
    assert "made from other content" in second.stderr
    assert (out / "img0.protected.png").read_bytes() == made
    # the same original again is skipped; once edited, it is not
    assert json.loads(run(["protect", str(a), "-o", str(out), *FAST, "--labels", "backbone", "--json"],
                          registry).stdout)["status"] == "skipped"  # fmt: skip
    a.write_bytes(b.read_bytes())
    edited = run(["protect", str(a), "-o", str(out), *FAST, "--labels", "backbone", "--json"], registry)
    assert edited.exit_code == 1 and "made from other content" in edited.stderr


def test_ctrl_c_stops_with_exit_130_and_leaves_only_whole_files(tmp_path: Path, registry: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import Protector

    _images(tmp_path / "in", n=3)

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Protector, "_compute", interrupted)
    result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["img0.png", "img1.png", "img2.png"]


def test_a_folder_without_images_named_beside_files_is_warned_about(tmp_path: Path, registry: Path) -> None:
    """A folder named like an image (``x.png/``), or one left empty, among inputs that were found went
    unnoticed, even at -v: it is named on stderr, the run goes on."""
    (image,) = _images(tmp_path / "in", n=1)
    (tmp_path / "x.png").mkdir()
    result = run(["protect", str(tmp_path / "x.png"), str(image), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 0 and (tmp_path / "in" / "img0.protected.png").is_file()
    assert f"warning: {tmp_path / 'x.png'}: a folder without images" in result.stderr
    assert run(["protect", str(tmp_path / "x.png"), str(image), *FAST, "--labels", "backbone", "-q",
                "--overwrite"], registry).stderr == ""  # fmt: skip
    alone = run(["protect", str(tmp_path / "x.png"), *FAST, "--labels", "backbone"], registry)
    assert alone.exit_code == 2 and alone.stderr.splitlines() == [f"error: no images found in {tmp_path / 'x.png'}"]


def test_a_folder_in_the_way_of_an_output_fails_without_advising_overwrite(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "p", n=1)
    (tmp_path / "p" / "img0.protected.png").mkdir()  # --overwrite cannot replace a folder
    result = run(["protect", str(tmp_path / "p" / "img0.png"), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 1
    assert "is a folder: move it" in result.stderr and "--overwrite" not in result.stderr


def test_ctrl_c_lists_every_output_it_leaves_on_disk(tmp_path: Path, registry: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Interrupted after some batches, the run still finishes the files being written and prints each:
    a pipeline reading stdout learns of every output on disk (a re-run skips them without a word)."""
    from preempt_cli import Protector

    write_random_pngs(tmp_path / "in", n=12, name="img{i:02d}.png")
    compute, batches = Protector._compute, []

    def interrupted_at_the_third_batch(self, batch):
        batches.append(len(batch))
        if len(batches) == 3:
            raise KeyboardInterrupt
        return compute(self, batch)

    monkeypatch.setattr(Protector, "_compute", interrupted_at_the_third_batch)
    out = tmp_path / "out"
    result = run(["protect", str(tmp_path / "in"), "-o", str(out), *FAST, "--labels", "backbone", "--batch-size",
                  "4", "--io", "threads", "--workers", "2"], registry)  # fmt: skip
    assert result.exit_code == 130 and "interrupted" in result.stderr
    on_disk = sorted(p.name for p in out.iterdir())
    assert len(on_disk) == 8 and all(n.endswith(".protected.png") for n in on_disk)  # no temporary files
    assert sorted(Path(line).name for line in result.stdout.splitlines()) == on_disk
    # the summary says what the interrupted run did, before the line that says it stopped
    summary, stopped = result.stderr.splitlines()[-2:]
    assert summary.startswith("Protected 8, skipped 0, failed 0 in ") and stopped.startswith("error: interrupted")


def test_an_interrupt_while_the_caller_holds_the_thread_still_reports_the_files_written(
        tmp_path: Path, tiny_backbone) -> None:  # fmt: skip
    """Ctrl-C lands wherever the main thread is: when that is the caller's own code (printing a result),
    the run learns of it through ``finish_interrupted`` and stops as it would have, reporting what it
    wrote."""
    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.protect import finish_interrupted

    write_random_pngs(tmp_path / "in", n=12, name="img{i:02d}.png")
    out = tmp_path / "out"
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        run_ = protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=out, batch_size=4, workers=2))
        reported = [next(run_)]
        reported += list(finish_interrupted(run_))
        assert list(finish_interrupted(run_)) == []  # an ended run gives nothing more
    assert all(r.status == "done" for r in reported)
    on_disk = sorted(p.name for p in out.iterdir())
    assert sorted(r.output.name for r in reported) == on_disk
    assert all(n.endswith(".protected.png") for n in on_disk)


def test_ctrl_c_in_stages_stops_then_waits_then_quits(tmp_path: Path) -> None:
    """The first Ctrl-C stops the command; a second, while it finishes the files being written, only says
    so (interrupting that clean-up aborted the interpreter: exit 134); a third quits at once, with 130."""
    import subprocess
    import sys

    script = tmp_path / "presses.py"
    script.write_text("""
import os, signal, time
from preempt_cli.cli._common import _stop_on_interrupt

with _stop_on_interrupt("stopping: finishing the batch"):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("still finishing", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("never", flush=True)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stdout.split("\n")[:2] == ["stopping", "still finishing"] and "never" not in done.stdout
    assert "finishing the files being computed and written" in done.stderr and "quit before" in done.stderr
    # the first press is answered at once (finishing a large photo takes a minute: silent, it looked hung)
    assert done.stderr.splitlines()[0] == "preempt: stopping: finishing the batch"


class _ReaderGoesAway(__import__("io").StringIO):
    """A stdout whose reader takes ``lines`` lines, then goes away (``| head -1``)."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.lines = lines

    def write(self, text: str) -> int:
        if self.getvalue().count("\n") >= self.lines:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def _a_run_stopped_mid_way(n: int = 4):
    """Results of a run as ``Protector.run`` gives them: ``n`` files, then, stopped (the ``KeyboardInterrupt``
    its caller throws in), the file it was writing then."""
    from preempt_cli.protect import FileResult

    try:
        for i in range(n):
            yield FileResult(Path(f"{i}.png"), "done", output=Path(f"{i}.protected.png"))
    except KeyboardInterrupt:
        yield FileResult(Path("late.png"), "done", output=Path("late.protected.png"))


@pytest.mark.parametrize("quiet", [False, True])
def test_a_run_whose_stdout_reader_goes_away_says_what_it_did(monkeypatch: pytest.MonkeyPatch, capsys,
                                                              quiet: bool) -> None:
    """``preempt protect ... | head -1`` stopped with no summary at all: how far it got was not said. The
    summary now counts every file it wrote (those it finished after the reader went away too), unless -q."""
    from preempt_cli.cli import _common, _files

    monkeypatch.setattr("sys.stdout", _ReaderGoesAway(lines=1))
    with pytest.raises(BrokenPipeError):  # handle_errors turns it into exit 141
        _files._drive(_a_run_stopped_mid_way(), 4, run=_common.CommandRun(_common.NOTHING_WRITTEN), verb="protected",
                      json_out=False, quiet=quiet)  # fmt: skip
    summary = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Protected")]
    # 0.png listed, 1.png met the closed pipe, late.png was being written
    assert [line.split(" in ")[0] for line in summary] == ([] if quiet else ["Protected 3, skipped 0, failed 0"])


@pytest.mark.parametrize("written", [0, 2])
def test_a_stop_before_any_output_says_nothing_was_written(tmp_path: Path, registry: Path,
                                                          monkeypatch: pytest.MonkeyPatch, written: int) -> None:
    """A Ctrl-C before protect wrote anything (while the models loaded, or in the first batch) said
    "outputs written so far are complete", and the user looked for outputs that were not there."""
    from preempt_cli.cli import _files

    def stopped_run(protectors, items, options, **kwargs):
        yield from list(_a_run_stopped_mid_way(written))[:written]
        raise KeyboardInterrupt

    monkeypatch.setattr(_files, "run_on_devices", stopped_run)
    _images(tmp_path / "in", n=1)
    result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 130, result.output
    said = ("no output was written; run again to do the rest" if not written
            else "outputs written so far are complete; run again to do the rest")  # fmt: skip
    assert result.stderr.splitlines()[-1] == f"error: interrupted: {said}"
    assert f"Protected {written}, skipped 0, failed 0" in result.stderr


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_that_also_ends_the_reader_of_stdout_exits_as_a_stop(tmp_path: Path, signame: str, code: int) -> None:
    """``preempt protect ... --json | jq``, Ctrl-C (or scancel's SIGTERM to the whole step): the reader
    ends with preempt, whose listing of the files it finished meanwhile then hits the closed pipe. That
    exited 141 ("stdout closed by its reader", also in the --log file), without the line that says the
    run was interrupted and what a re-run does: the stop's own code and line now."""
    import subprocess
    import sys

    script = tmp_path / "stop_and_reader_gone.py"
    script.write_text(f"""
import os, signal, sys, time
import typer
from preempt_cli.cli._common import handle_errors

try:
    with handle_errors(stopping="stopping"):
        try:
            os.kill(os.getpid(), signal.{signame})
            time.sleep(5)
        except KeyboardInterrupt:  # a run finishes the files being written, then lists them
            pass
        raise BrokenPipeError(32, "Broken pipe")  # the reader was stopped too
except typer.Exit as e:
    sys.exit(e.exit_code)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: interrupted"), done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_once_the_command_is_over_or_before_it_starts_prints_no_traceback(tmp_path: Path) -> None:
    """A press while the interpreter exited after a finished run (torch's atexit clean-up) printed
    "Exception ignored in atexit callback ... KeyboardInterrupt"; one while the CLI imported torch ended it
    with exit 130 and nothing said."""
    import subprocess
    import sys

    script = tmp_path / "over.py"
    script.write_text("""
import atexit, os, signal, sys
sys.argv = ["preempt", "models", "list", "--json"]
atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))  # a press during the exit's clean-up
from preempt_cli.cli import main
main()
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert '"name": "preempt-resnet20-at"' in done.stdout
    # only at the exit: a caller of main() that goes on (a notebook) keeps its Ctrl-C
    again = tmp_path / "again.py"
    again.write_text("""
import signal, sys
sys.argv = ["preempt", "models", "list"]
from preempt_cli.cli import main
try:
    main()
except SystemExit:
    pass
print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
""")
    done = subprocess.run([sys.executable, str(again)], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "True", done.stdout
    starting = tmp_path / "starting.py"
    starting.write_text("""
import builtins, sys
real_import = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "cli":  # the press arrives while preempt_cli.cli (torch) is imported
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted
from preempt_cli.__main__ import main
main()
""")
    done = subprocess.run([sys.executable, str(starting)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130
    assert done.stderr == "error: interrupted: before the command started, nothing was done\n"


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("signame, code, by", [("SIGINT", 130, ""), ("SIGTERM", 143, " by SIGTERM"),
                                               ("SIGHUP", 129, " by SIGHUP"), ("ignored SIGHUP", 0, None)])
def test_a_stop_while_torch_imports_numpy_ends_the_command(tmp_path: Path, signame: str, code: int,
                                                           by: str | None) -> None:  # fmt: skip
    """torch's C code imports numpy and drops an error raised meanwhile: a Ctrl-C that landed there (about
    0.6 s after the start) was lost, and the command ran to its end with exit 0 (numpy unusable from torch).
    The press is held until the CLI is imported, then ends it as one before the command does. SIGTERM
    (scancel, timeout) and SIGHUP killed the process then, saying nothing: they are said as Ctrl-C is, with
    their own exit code; a SIGHUP ignored (nohup) stays ignored."""
    ignored = signame.startswith("ignored ")
    script = tmp_path / "numpy_import.py"
    script.write_text(f"""
import os, signal, sys
if {ignored!r}:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
class PressDuringNumpysImport:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":  # imported first by torch's C code (torch._C)
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signame.split()[-1]})
        return None
sys.meta_path.insert(0, PressDuringNumpysImport())
sys.argv = ["preempt", "models", "list", "--json"]
from preempt_cli.__main__ import main
main()
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    if ignored:
        assert json.loads(done.stdout.splitlines()[0])["name"] and done.stderr == ""
    else:
        assert done.stderr == f"error: interrupted{by}: before the command started, nothing was done\n"
        assert done.stdout == ""


@pytest.mark.parametrize("signame, code, by", [("SIGINT", 130, ""), ("SIGTERM", 143, " by SIGTERM")])
@pytest.mark.parametrize("where", ["building the command", "parsing its arguments", "logging its settings"])
def test_a_stop_while_typer_sets_the_command_up_is_said_as_before_it_started(tmp_path: Path, where: str,
                                                                              signame: str, code: int,
                                                                              by: str) -> None:  # fmt: skip
    """Between the import and the command's own handling of Ctrl-C, Typer builds the command (a press there
    ended with a traceback of typing's internals) and parses the arguments (Typer's silent exit 130). A
    SIGTERM there killed the process, saying nothing; said, its --log file ended "exit code 130
    (interrupted)" of a process that exited 143, without the line that says it. One while the command logged
    its settings, before its own handlers were in place, exited 130 saying nothing, SIGTERM's too."""
    import subprocess
    import sys

    log = tmp_path / "run.log"
    script = tmp_path / "setup.py"
    script.write_text(f"""
import os, signal, sys
import typer.main
from preempt_cli.cli import _common, _logfile
from preempt_cli.__main__ import main
def pressed(*args, **kwargs):
    os.kill(os.getpid(), signal.{signame})
if {where!r} == "building the command":
    typer.main.get_command = pressed
elif {where!r} == "parsing its arguments":  # protect's first call, before its errors are handled
    _common.setup_logging = pressed
else:  # the first step of handle_errors
    _logfile.settings = pressed
sys.argv = ["preempt", "protect", {str(tmp_path)!r}, "--log", {str(log)!r}]
main()
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (code, f"error: interrupted{by}: before the command started, "
                                                    "nothing was done\n")  # fmt: skip
    if where != "building the command":  # (which comes before the log is opened)
        said = [line.split("] ", 1)[1] for line in log.read_text().splitlines()]
        assert said[-2] == f"error: interrupted{by}: before the command started, nothing was done", said
        meaning = "interrupted" if code == 130 else f"stopped by {signame}"
        assert said[-1].startswith(f"error: exit code {code} ({meaning}) after "), said


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_once_the_command_has_ended_leaves_its_exit_code(tmp_path: Path, signame: str) -> None:
    """A Ctrl-C or SIGTERM (a Slurm job cancelled as the run finished) in the moment after the command had
    ended, its summary said, went to the handler of a stop before the command: "interrupted by SIGTERM:
    before the command started, nothing was done" of a finished run, exit 143, and no exit code in the
    --log file. Its work is done: its exit code stands, and a line says the stop came late."""
    log = tmp_path / "run.log"
    script = tmp_path / "late.py"
    script.write_text(f"""
import os, signal, sys
from preempt_cli.cli import _common
from preempt_cli.__main__ import main
real_exit_status = _common.exit_status
def exit_status(*args, **kwargs):  # the command is over: the group's main reads its exit code
    os.kill(os.getpid(), signal.{signame})
    return real_exit_status(*args, **kwargs)
_common.exit_status = exit_status
sys.argv = ["preempt", "models", "list", "--json", "--log", {str(log)!r}]
main()
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"preempt: {signame} came after the command had ended: nothing was interrupted\n"
    assert json.loads(done.stdout.splitlines()[0])["name"]
    said = [line.split("] ", 1)[1] for line in log.read_text().splitlines()]
    assert said[-1].startswith("info: exit code 0 (all done) after "), said
    if signame == "SIGTERM":  # one who insists (a third) still ends the exit at once, with the stop's code
        script.write_text(script.read_text().replace("    os.kill(", "    for _ in range(3): os.kill("))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 143, done.stderr
        assert "exit code 143 (stopped by SIGTERM)" in log.read_text().splitlines()[-1]


def test_the_default_budget_is_the_papers_for_the_backbones_dataset(registry: Path) -> None:
    from preempt_cli.cli._files import _config

    assert _config("paper", None, None, None, None, None, backbone="deit-b", registry=None).eps == 4 / 255
    assert _config("paper", None, None, None, None, None, backbone="tiny-key", registry=[registry]).eps == 8 / 255
    assert _config("paper", "2/255", None, None, None, None, backbone="deit-b", registry=None).eps == 2 / 255


def test_deterministic_for_a_seed(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "in", n=2)
    outs = []
    for seed, d in ((0, "a"), (0, "b"), (1, "c")):
        args = ["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "--seed", str(seed), "-o", str(tmp_path / d)]
        assert run(args, registry).exit_code == 0
        outs.append(np.asarray(Image.open(tmp_path / d / "img0.protected.png")))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_bad_inputs_fail_alone_with_named_reasons(tmp_path: Path, registry: Path) -> None:
    folder = tmp_path / "mixed"
    good = _images(folder, n=2)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    Image.new("RGB", (400, 400)).save(folder / "big.png")
    result = run(["protect", str(folder), *FAST, "--labels", "backbone", "--json", "--max-pixels", "100000"], registry)
    assert result.exit_code == 1
    by_name = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert {n for n, r in by_name.items() if r["status"] == "done"} == {p.name for p in good}
    assert "empty" in by_name["empty.jpg"]["reason"]
    assert "not an image" in by_name["notes.jpg"]["reason"]
    assert by_name["corrupt.png"]["status"] == "failed"
    assert "decompression" in by_name["big.png"]["reason"]
    for name in ("corrupt.png", "empty.jpg", "notes.jpg", "big.png"):
        assert f"{folder / name}:" in result.stderr  # one error line naming the file
    assert not (folder / "corrupt.protected.png").exists()


def test_missing_file_named_directly_fails_with_exit_1(tmp_path: Path, registry: Path) -> None:
    (good,) = _images(tmp_path, n=1)
    result = run(["protect", str(good), str(tmp_path / "nope.png"), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 1
    assert "nope.png: no such file" in result.stderr
    assert (tmp_path / "img0.protected.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "no-such-model", "--labels", "backbone"], "unknown model 'no-such-model'"),
        (["-b", "tiny-key", "--eps", "abc"], "invalid eps"),
        (["-b", "tiny-key", "--shard", "3/2"], "--shard"),
        (["-b", "tiny-key", "--preset", "fancy"], "unknown preset"),
        (["-b", "tiny-key"], "no classifier"),
        (["-b", "tiny-key", "-c", "tiny-labeller"], "sha256"),
        (["-b", "tiny-key", "--labels", "nofile.csv"], "--labels"),
        (["-b", "tiny-key", "--labels", "backbone", "--max-pixels", "0"], "--max-pixels must be >= 1"),
        (["-b", "tiny-key", "--labels", "backbone", "--max-pixels", "-5"], "--max-pixels must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, registry: Path, args: list[str], message: str) -> None:
    _images(tmp_path, n=1)
    result = run(["protect", str(tmp_path), "--device", TEST_DEVICE_ARG, *args], registry)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.protected.png"))


def test_stdin_out_dir_and_suffix(tmp_path: Path, registry: Path) -> None:
    paths = _images(tmp_path / "src" / "sub", n=2)
    listing = "\n".join(str(p) for p in paths) + "\n"
    result = run(["protect", "-", *FAST, "--labels", "backbone", "--suffix", ".safe"], registry, input=listing)
    assert result.exit_code == 0, result.stderr
    assert all((p.parent / f"{p.stem}.safe.png").exists() for p in paths)
    result = run(["protect", str(tmp_path / "src"), *FAST, "--labels", "backbone", "-o", str(tmp_path / "out")], registry)
    assert result.exit_code == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "sub/img0.protected.png",
        "sub/img1.protected.png",
    ]


def test_labels_from_folders_and_csv(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "data" / "cat", n=1)
    _images(tmp_path / "data" / "ship", n=1)
    result = run(["protect", str(tmp_path / "data"), *FAST, "--labels", "folders", "--json"], registry)
    assert result.exit_code == 0
    labels = {Path(r["input"]).parent.name: r["label_name"] for r in map(json.loads, result.stdout.splitlines())}
    assert labels == {"cat": "cat", "ship": "ship"}
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\ncat/img0.png,frog\nship/img0.png,9\n")
    result = run(["protect", str(tmp_path / "data"), *FAST, "--labels", str(csv), "--json", "--overwrite",
                  "-o", str(tmp_path / "o")], registry)  # fmt: skip
    labels = {Path(r["input"]).parent.name: r["label"] for r in map(json.loads, result.stdout.splitlines())}
    assert labels == {"cat": 6, "ship": 9}


def test_labels_from_folders_whichever_way_the_files_are_named(tmp_path: Path, registry: Path) -> None:
    # each class folder given (`data/*`), or the files listed on stdin: each file's class is the folder holding
    # it. Both failed every file with "--labels folders needs inputs inside class folders", though each was
    _images(tmp_path / "data" / "cat", n=1)
    _images(tmp_path / "data" / "ship", n=2)

    def labels(result) -> dict[str, str]:
        assert result.exit_code == 0, result.stderr
        return {Path(r["input"]).parent.name: r["label_name"] for r in map(json.loads, result.stdout.splitlines())}

    folders = [str(tmp_path / "data" / "cat"), str(tmp_path / "data" / "ship")]
    by_folder = run(["protect", *folders, *FAST, "--labels", "folders", "--json", "-o", str(tmp_path / "a")], registry)
    assert labels(by_folder) == {"cat": "cat", "ship": "ship"}
    listing = f"{tmp_path / 'data' / 'cat' / 'img0.png'}\n{tmp_path / 'data' / 'ship' / 'img1.png'}\n"
    listed = run(["protect", "-", *FAST, "--labels", "folders", "--json", "-o", str(tmp_path / "b")], registry,
                 input=listing)  # fmt: skip
    assert labels(listed) == {"cat": "cat", "ship": "ship"}
    # a folder of photos, not of classes: its name is no class, and the error says where the label came from
    _images(tmp_path / "holiday", n=1)
    flat = run(["protect", str(tmp_path / "holiday"), *FAST, "--labels", "folders"], registry)
    assert flat.exit_code == 1
    assert "unknown class 'holiday'" in flat.stderr, flat.stderr
    assert "--labels folders takes a file's class from its folder (ROOT/<class>/<file>)" in flat.stderr
    # a class folder mistyped: the class meant, then the same note, as one sentence after the other
    _images(tmp_path / "typo" / "ships", n=1)
    typo = run(["protect", str(tmp_path / "typo"), *FAST, "--labels", "folders"], registry)
    assert typo.exit_code == 1
    assert "unknown class 'ships' for model tiny-key" in typo.stderr
    assert "Did you mean 'ship'? --labels folders takes a file's class from its folder (ROOT/<class>/<file>)" \
           in typo.stderr, typo.stderr


def test_shards_partition_the_inputs(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "many", n=6)
    seen = []
    for k in (1, 2, 3):
        r = run(["protect", str(tmp_path / "many"), *FAST, "--labels", "backbone", "--shard", f"{k}/3", "--json"],
                registry)  # fmt: skip
        assert r.exit_code == 0
        seen.append({json.loads(x)["input"] for x in r.stdout.splitlines()})
    assert sum(len(s) for s in seen) == 6 and len(set().union(*seen)) == 6


def test_the_progress_bar_of_a_shard_counts_the_shards_files(tmp_path: Path, registry: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A shard's bar counted every input of the job: a finished shard 1/8 stopped at 1/8 of its end, its
    time left 8 times too long. Its total is the files the shard takes, for protect and revert alike."""
    from preempt_cli.cli import _common

    totals: list[int] = []

    class Recorded(_common._NoProgress):
        def add_task(self, *args, total: int | None = None, **kwargs) -> int:
            totals.append(total)
            return 0

    monkeypatch.setattr(_common, "progress_bar", lambda *columns, quiet: Recorded())
    _images(tmp_path / "many", n=6)
    for args in ([], ["-o", str(tmp_path / "out")]):
        for k in (1, 2, 3):
            totals.clear()
            r = run(["protect", str(tmp_path / "many"), *FAST, "--labels", "backbone", "--shard", f"{k}/3", "--json",
                     *args], registry)  # fmt: skip
            assert r.exit_code == 0, r.output
            assert totals == [len(r.stdout.splitlines())], (args, k)
    reverts = (["--white-box"], ["-b", "tiny-key", "--labels", "backbone"])
    for k, how in ((1, reverts[0]), (2, reverts[0]), (3, reverts[1])):
        totals.clear()
        r = run(["revert", str(tmp_path / "many"), "--device", TEST_DEVICE_ARG, "--shard", f"{k}/3", "--json", *how],
                registry)  # fmt: skip
        assert r.exit_code == 0, r.output
        assert totals == [len(r.stdout.splitlines())], (how, k)


def test_revert_white_box_uses_the_recorded_key(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "r", n=2)
    assert run(["protect", str(tmp_path / "r"), *FAST, "-c", "tiny-labeller-unpinned"], registry).exit_code == 0
    plain = tmp_path / "r" / "img0.png"
    result = run(["revert", str(tmp_path / "r"), "--white-box", "--json", "--device", TEST_DEVICE_ARG], registry)
    rows = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    # Originals (no metadata) found by the folder walk are skipped; protected files are reverted within eps.
    assert result.exit_code == 0 and rows[plain.name]["status"] == "skipped"
    assert rows[plain.name]["reason"] == "not protected by preempt" and "error" not in result.stderr
    # an original named directly fails with the reason
    named = run(["revert", str(plain), "--white-box", "--json", "--device", TEST_DEVICE_ARG], registry)
    assert named.exit_code == 1 and "no preempt metadata" in json.loads(named.stdout)["reason"]
    for name in ("img0.protected.png", "img1.protected.png"):
        assert rows[name]["status"] == "done"
        out = Path(rows[name]["output"])
        meta = json.loads(Image.open(out).text["preempt"])
        assert meta["kind"] == "reverted" and meta["backbone"] == "tiny-key" and meta["samples"] == 3
        a = np.asarray(Image.open(tmp_path / "r" / name), dtype=np.int64)
        b = np.asarray(Image.open(out), dtype=np.int64)
        assert 0 < np.abs(a - b).max() <= EPS_LEVELS


def test_revert_white_box_skips_a_reversions_output_named_directly(tmp_path: Path, registry: Path) -> None:
    # both commands skip what preempt's metadata calls a reversion's output, unless --overwrite: a white-box
    # reversion failed it (exit 1) where a black-box one skipped it, as the README says (exit 0)
    _images(tmp_path / "r", n=1)
    assert run(["protect", str(tmp_path / "r"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    white_box = ["--white-box", "--json", "--device", TEST_DEVICE_ARG]
    assert run(["revert", str(tmp_path / "r"), *white_box], registry).exit_code == 0
    for name in ("img0.protected.reverted.png", "img0.protected.rv.png"):  # (named as outputs or not)
        reverted = tmp_path / "r" / name
        if not reverted.exists():
            reverted.write_bytes((tmp_path / "r" / "img0.protected.reverted.png").read_bytes())
        result = run(["revert", str(reverted), *white_box], registry)
        row = json.loads(result.stdout)
        assert result.exit_code == 0 and row["status"] == "skipped", result.output
        assert row["reason"].startswith("already reverted by preempt") and "error" not in result.stderr
        # --overwrite asks for it: a white-box reversion cannot take it without a protected file's record
        result = run(["revert", str(reverted), *white_box, "--overwrite"], registry)
        row = json.loads(result.stdout)
        assert result.exit_code == 1 and row["status"] == "failed" and "not a protected image" in row["reason"]


def test_revert_white_box_reruns_the_recorded_defense_with_every_recorded_setting(tmp_path: Path,
                                                                                  registry: Path) -> None:  # fmt: skip
    # settings far from every default: a reverter that fell back to any default would differ
    from preempt_cli import ForeBackConfig
    from preempt_cli.imageio import quantize, read_image
    from preempt_cli.models import load_model
    from preempt_cli.protect import content_seed
    from preempt_cli.revert import Reverter

    _images(tmp_path / "r", n=1)
    settings = ["--preset", "mspd", "--eta", "0.9", "--eps", "6/255", "--forward", "2", "--backward", "1",
                "-n", "2", "--seed", "3", "-b", "tiny-key", "--labels", "backbone", "--device", TEST_DEVICE_ARG]  # fmt: skip
    assert run(["protect", str(tmp_path / "r"), *settings], registry).exit_code == 0
    protected = tmp_path / "r" / "img0.protected.png"
    result = run(["revert", str(protected), "--white-box", "--json", "--device", TEST_DEVICE_ARG], registry)
    assert result.exit_code == 0, result.output
    out = Path(json.loads(result.stdout)["output"])
    meta = json.loads(Image.open(out).text["preempt"])
    assert (meta["eta"], meta["forward_steps"], meta["backward_steps"], meta["samples"], meta["seed"],
            meta["sample_projection"]) == (0.9, 2, 1, 2, 3, "iterate")  # fmt: skip
    assert meta["eps"] == pytest.approx(6 / 255)
    # and the pixels are that defense's reversion, not only its label on the file
    config = ForeBackConfig(eps=6 / 255, eta=0.9, forward_steps=2, backward_steps=1, samples=2,
                            sample_projection="iterate")  # fmt: skip
    key = load_model("tiny-key", registry=[registry], device=TEST_DEVICE)
    reverter = Reverter(key, labels="backbone", config=config, seed=3)
    picture = read_image(protected)
    x = picture.to_tensor().unsqueeze(0).to(TEST_DEVICE)
    expected = quantize(reverter.transform(x, reverter.predict(x).clone(), noise_seeds=[content_seed(picture.color)])[0],
                        picture.color, config.eps)  # fmt: skip
    assert np.array_equal(read_image(out).color, expected)


def test_revert_white_box_names_outputs_over_every_recorded_defense(tmp_path: Path, registry: Path) -> None:
    # two folders protected with other seeds (two defenses, reverted in two groups) hold a file of one
    # name: into one --out-dir each keeps its own output, as protect names them
    for day, seed in (("day1", "1"), ("day2", "2")):
        _images(tmp_path / day, n=1, seed=int(seed))
        protected = run(["protect", str(tmp_path / day), *FAST, "--labels", "backbone", "--seed", seed], registry)
        assert protected.exit_code == 0
    out = tmp_path / "out"
    result = run(["revert", str(tmp_path / "day1"), str(tmp_path / "day2"), "--white-box", "-o", str(out), "--json",
                  "--device", TEST_DEVICE_ARG], registry)  # fmt: skip
    rows = [json.loads(x) for x in result.stdout.splitlines() if json.loads(x)["status"] != "skipped"]
    assert result.exit_code == 0 and [r["status"] for r in rows] == ["done", "done"]
    assert sorted(str(Path(r["output"]).relative_to(out)) for r in rows) == [
        "day1/img0.protected.reverted.png", "day2/img0.protected.reverted.png"]
    seeds = {json.loads(Image.open(r["output"]).text["preempt"])["seed"] for r in rows}
    assert seeds == {1, 2}


def test_revert_white_box_fails_files_of_a_defense_it_cannot_rebuild_and_goes_on(tmp_path: Path,
                                                                                   registry: Path) -> None:  # fmt: skip
    from PIL import PngImagePlugin

    _images(tmp_path / "r", n=1)
    assert run(["protect", str(tmp_path / "r"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    good = tmp_path / "r" / "img0.protected.png"
    meta = json.loads(Image.open(good).text["preempt"])
    broken = {"unknown-key": {**meta, "backbone": "no-such-model"},
              "no-eps": {k: v for k, v in meta.items() if k != "eps"}, "a-list": [meta],
              "a-billion-samples": {**meta, "samples": 10**9}, "no-seed": {k: v for k, v in meta.items() if k != "seed"},
              "unknown-preset": {**meta, "preset": "nope"}, "a-dict-preset": {**meta, "preset": {"eps": 1}},
              "not-json": "{not json"}  # fmt: skip
    for name, doc in broken.items():
        info = PngImagePlugin.PngInfo()
        info.add_itxt("preempt", doc if isinstance(doc, str) else json.dumps(doc))
        Image.open(good).save(tmp_path / "r" / f"{name}.protected.png", pnginfo=info)
    # files that cannot be read: each fails with its read's reason, not as a file without metadata
    (tmp_path / "r" / "truncated.protected.png").write_bytes(good.read_bytes()[:100])
    (tmp_path / "r" / "garbage.protected.png").write_bytes(b"garbage\n")
    os.mkfifo(tmp_path / "piped.protected.png")  # as <(cat x.protected.png) is: read once, never twice
    result = run(["revert", str(tmp_path / "r"), str(tmp_path / "gone.protected.png"),
                  str(tmp_path / "piped.protected.png"), "--white-box", "--json", "--device", TEST_DEVICE_ARG],
                 registry)  # fmt: skip
    rows = {Path(r["input"]).stem: r for r in map(json.loads, result.stdout.splitlines())}
    assert result.exit_code == 1 and rows["img0.protected"]["status"] == "done"
    assert "no-such-model" in rows["unknown-key.protected"]["reason"]
    assert "'eps'" in rows["no-eps.protected"]["reason"]
    assert "not a valid record" in rows["a-list.protected"]["reason"]
    assert "not a valid record" in rows["not-json.protected"]["reason"]
    assert "passes per image" in rows["a-billion-samples.protected"]["reason"]  # refused, not run out of memory
    assert "records no seed" in rows["no-seed.protected"]["reason"]  # not reverted with seed 0 in silence
    assert "unknown preset 'nope'" in rows["unknown-preset.protected"]["reason"]  # not copied into the output
    assert "unknown preset {'eps': 1}" in rows["a-dict-preset.protected"]["reason"]  # not "unhashable type"
    assert rows["gone.protected"]["reason"] == "no such file"
    assert rows["piped.protected"]["reason"].startswith("a pipe: --white-box reads a file's metadata")
    assert "not an image" in rows["garbage.protected"]["reason"]
    assert "metadata" not in rows["truncated.protected"]["reason"]
    assert all(rows[f"{n}.protected"]["status"] == "failed" for n in [*broken, "gone", "garbage", "truncated", "piped"])


def test_white_box_refuses_other_weights_only_for_the_files_they_protected(tmp_path: Path, registry: Path) -> None:
    """A recorded model name that now loads other weights only warned, exit 0: a black-box reversion passed
    for white-box, its result read as the key's. Those files now fail (exit 1) unless --allow-changed-models
    runs them, with the warning; the other files are reverted either way."""
    from PIL import PngImagePlugin

    _images(tmp_path / "r", n=2)
    assert run(["protect", str(tmp_path / "r"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    edited = tmp_path / "r" / "img1.protected.png"
    meta = json.loads(Image.open(edited).text["preempt"])
    info = PngImagePlugin.PngInfo()
    info.add_itxt("preempt", json.dumps({**meta, "backbone_sha256": "0" * 64}))
    Image.open(edited).save(edited, pnginfo=info)
    white_box = ["revert", str(tmp_path / "r"), "--white-box", "--device", TEST_DEVICE_ARG]
    result = run([*white_box, "--json"], registry)
    rows = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert result.exit_code == 1 and rows["img0.protected.png"]["status"] == "done"
    assert rows["img1.protected.png"]["status"] == "failed"
    reason = rows["img1.protected.png"]["reason"]
    assert "backbone tiny-key differs from the weights that protected 1 file(s)" in reason  # had counted 2
    assert "black-box, not white-box" in reason and "--allow-changed-models" in reason
    assert not (tmp_path / "r" / "img1.protected.reverted.png").exists()
    allowed = run([*white_box, "--allow-changed-models"], registry)
    assert allowed.exit_code == 0 and (tmp_path / "r" / "img1.protected.reverted.png").exists()
    assert "backbone tiny-key differs from the weights that protected 1 file(s)" in allowed.stderr
    # the classifier's weights too (they were not compared: the reversion passed for white-box silently)
    _images(tmp_path / "c", n=1)
    assert run(["protect", str(tmp_path / "c"), *FAST, "-c", "tiny-labeller-unpinned"], registry).exit_code == 0
    edited = tmp_path / "c" / "img0.protected.png"
    meta = json.loads(Image.open(edited).text["preempt"])
    assert meta["classifier"] == "tiny-labeller-unpinned" and meta["classifier_sha256"]
    info = PngImagePlugin.PngInfo()
    info.add_itxt("preempt", json.dumps({**meta, "classifier_sha256": "0" * 64}))
    Image.open(edited).save(edited, pnginfo=info)
    refused = run(["revert", str(edited), "--white-box", "--device", TEST_DEVICE_ARG], registry)
    assert refused.exit_code == 1 and not (tmp_path / "c" / "img0.protected.reverted.png").exists()
    assert "classifier tiny-labeller-unpinned differs from the weights that protected 1 file(s)" in refused.stderr
    assert "backbone" not in refused.stderr
    allowed = run(["revert", str(edited), "--white-box", "--allow-changed-models", "--device", TEST_DEVICE_ARG],
                  registry)  # fmt: skip
    assert allowed.exit_code == 0 and (tmp_path / "c" / "img0.protected.reverted.png").exists()
    assert "classifier tiny-labeller-unpinned differs from the weights that protected 1 file(s)" in allowed.stderr


def test_white_box_checks_each_file_s_recorded_setup_not_its_group_s_first(tmp_path: Path, registry: Path) -> None:
    """Files were grouped by their models' names and sha256 alone, and a group's first file's record checked
    for all: a file protected under a registry row set up otherwise (``backbone_setup``), beside one made
    under the current row, was reverted in silence as white-box."""
    from PIL import PngImagePlugin

    _images(tmp_path / "r", n=2)
    assert run(["protect", str(tmp_path / "r"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    edited = tmp_path / "r" / "img1.protected.png"  # the second file of the walk: the first stood for both
    meta = json.loads(Image.open(edited).text["preempt"])
    info = PngImagePlugin.PngInfo()
    info.add_itxt("preempt", json.dumps({**meta, "backbone_setup": "0" * 16}))
    Image.open(edited).save(edited, pnginfo=info)
    result = run(["revert", str(tmp_path / "r"), "--white-box", "--json", "--device", TEST_DEVICE_ARG], registry)
    rows = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert result.exit_code == 1 and rows["img0.protected.png"]["status"] == "done"
    assert rows["img1.protected.png"]["status"] == "failed"
    assert "backbone tiny-key is set up otherwise (registry row" in rows["img1.protected.png"]["reason"]
    assert "protected 1 file(s)" in rows["img1.protected.png"]["reason"]


def test_allow_changed_models_is_refused_without_white_box(tmp_path: Path, registry: Path) -> None:
    # a black-box reversion compares no recorded weights: the flag would be silently ignored
    (image,) = _images(tmp_path, n=1)
    result = run(["revert", str(image), *FAST, "--labels", "backbone", "--allow-changed-models"], registry)
    assert result.exit_code == 2 and "--allow-changed-models is for --white-box" in result.stderr
    assert not (tmp_path / "img0.reverted.png").exists()


def _white_box_warnings(meta: dict, models: dict, caplog: pytest.LogCaptureFixture, state_digests=None) -> str:
    """The warnings of :func:`_white_box_reverter` rebuilding the defense of ``meta`` from ``models`` with
    ``allow_changed_models`` (which it refuses without: see :func:`_white_box_refusal`)."""
    from preempt_cli.cli import _files

    caplog.clear()
    with caplog.at_level("WARNING", logger="preempt_cli"):
        more = () if state_digests is None else (state_digests,)
        _files._white_box_reverter(meta, models.__getitem__, None, None, "off", 1, *more,
                                   allow_changed_models=True).close()  # fmt: skip
    return caplog.text


def _white_box_refusal(meta: dict, models: dict) -> str:
    """Why :func:`_white_box_reverter` refuses to rebuild the defense of ``meta`` from ``models`` ("": it
    does not)."""
    from preempt_cli.cli import _files

    try:
        _files._white_box_reverter(meta, models.__getitem__, None, None, "off", 1).close()
    except ValueError as error:
        return str(error)
    return ""


def _state_record() -> dict:
    """The run settings recorded by a tiny-key backbone without a file: its state's sha256."""
    from conftest import make_tiny_model
    from preempt_cli import ForeBackConfig, Protector

    meta = Protector(make_tiny_model(0, name="tiny-key"), labels="backbone", config=ForeBackConfig(samples=2)).run_settings()
    assert meta["backbone_sha256_of"] == "state"
    return meta


def test_white_box_tells_other_weights_of_a_model_without_a_file(caplog: pytest.LogCaptureFixture) -> None:
    # a model without a file (timm's own weights, a net of the caller's) records its state's sha256: it was
    # compared with the loaded model's file's, of which it has none, so other weights were never told
    from conftest import make_tiny_model

    meta = _state_record()
    assert "backbone tiny-key differs from the weights that protected 1 file(s)" in _white_box_warnings(
        meta, {"tiny-key": make_tiny_model(1, name="tiny-key")}, caplog)  # fmt: skip
    assert "differs" not in _white_box_warnings(meta, {"tiny-key": make_tiny_model(0, name="tiny-key")}, caplog)
    # refused without --allow-changed-models: a reversion with other weights is black-box
    assert "differs from the weights" in _white_box_refusal(meta, {"tiny-key": make_tiny_model(1, name="tiny-key")})
    assert _white_box_refusal(meta, {"tiny-key": make_tiny_model(0, name="tiny-key")}) == ""


def test_white_box_compares_a_state_s_sha256_with_the_state_of_a_model_now_from_a_file(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    # the same weights now from a file (timm's own weights, converted): a state's sha256 is no file's, and
    # the file's was compared with it, warning that the weights differ
    from conftest import make_tiny_model
    from preempt_cli.cli import _files
    from preempt_cli.models import state_sha256

    meta = _state_record()
    from_file, other = make_tiny_model(0, name="tiny-key"), make_tiny_model(1, name="tiny-key")
    from_file.weights_sha256 = other.weights_sha256 = "f" * 64
    assert "differs" not in _white_box_warnings(meta, {"tiny-key": from_file}, caplog)
    assert "differs" in _white_box_warnings(meta, {"tiny-key": other}, caplog)
    # computed once per model in a run, and only where a record asks for it
    hashed: list = []
    monkeypatch.setattr(_files, "state_sha256", lambda m: hashed.append(m) or state_sha256(m))
    digests: dict = {}
    for seed in range(2):  # two groups of files
        assert "differs" not in _white_box_warnings({**meta, "seed": seed}, {"tiny-key": from_file}, caplog, digests)
    assert hashed == [from_file]
    by_file = {**meta, "backbone_sha256": "f" * 64, "backbone_sha256_of": "file"}
    assert "differs" not in _white_box_warnings(by_file, {"tiny-key": from_file}, caplog) and len(hashed) == 1
    assert "differs" in _white_box_warnings({**by_file, "backbone_sha256": "e" * 64}, {"tiny-key": from_file}, caplog)
    # a file's sha256 cannot be compared with a model without a file; a record older than _sha256_of is
    # compared with a file's sha256, as it was
    assert "differs" not in _white_box_warnings(by_file, {"tiny-key": make_tiny_model(1, name="tiny-key")}, caplog)
    old = {k: v for k, v in meta.items() if k != "backbone_sha256_of"}
    assert "differs" not in _white_box_warnings(old, {"tiny-key": make_tiny_model(1, name="tiny-key")}, caplog)
    assert "differs" in _white_box_warnings(old, {"tiny-key": from_file}, caplog) and len(hashed) == 1


def test_a_model_that_failed_to_load_is_tried_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # a white-box reversion asks for its recorded models once per group of settings: a model missing from
    # the Hub's cache took 24 s of retries each time
    from preempt_cli.cli import _files
    from preempt_cli.errors import UnknownModelError

    calls: list[str] = []

    def failing(name, *args):
        calls.append(name)
        raise UnknownModelError(name, [])

    monkeypatch.setattr(_files, "_load", failing)
    load = _files._model_cache(torch.device("cpu"), None, None)
    for _ in range(3):
        with pytest.raises(UnknownModelError):
            load("deit-b")
    assert calls == ["deit-b"]


def test_precision_is_recorded_and_white_box_reversion_follows_it(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "p", n=1)
    assert run(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone", "--precision", "bf16"], registry).exit_code == 0
    meta = json.loads(Image.open(tmp_path / "p" / "img0.protected.png").text["preempt"])
    assert meta["precision"] == "bf16"
    result = run(["revert", str(tmp_path / "p" / "img0.protected.png"), "--white-box", "--device", TEST_DEVICE_ARG], registry)
    assert result.exit_code == 0
    reverted = json.loads(Image.open(tmp_path / "p" / "img0.protected.reverted.png").text["preempt"])
    assert reverted["precision"] == "bf16"
    bad = run(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone", "--precision", "fp8"], registry)
    assert bad.exit_code == 2 and "precision" in bad.stderr


def test_revert_needs_a_backbone_or_white_box(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path, n=1)
    result = run(["revert", str(tmp_path)], registry)
    assert result.exit_code == 2 and "--white-box" in result.stderr


def test_revert_black_box_names_a_mistyped_backbone_before_loading_the_classifier(tmp_path: Path,
                                                                                      registry: Path) -> None:
    # as protect does: the backbone given is checked first, so its typo is the error, not the classifier's
    # weights (tiny-labeller's pin does not match: loading it first would say "sha256")
    _images(tmp_path, n=1)
    result = run(["revert", str(tmp_path), "-b", "no-such-model", "-c", "tiny-labeller", "--device", TEST_DEVICE_ARG],
                 registry)  # fmt: skip
    assert result.exit_code == 2
    assert "unknown model 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_commands(registry: Path) -> None:
    listed = run(["models", "list", "--json"], registry)
    names = {json.loads(x)["name"] for x in listed.stdout.splitlines()}
    assert {"tiny-key", "cifar10-resnet20-pgdat-a", "preact18"} <= names
    shown = json.loads(run(["models", "show", "tiny-labeller", "--json"], registry).stdout)
    assert shown["arch"] == "cifar_resnet20" and shown["role"] == "classifier"
    ok = run(["models", "verify", "tiny-key"], registry)
    assert ok.exit_code == 0 and "sha256 matches pin" in ok.stdout
    bad = run(["models", "verify", "tiny-labeller"], registry)
    assert bad.exit_code == 1 and "sha256" in bad.stderr
    assert run(["models", "show", "nope"], registry).exit_code == 2


def test_models_convert_refuses_code_and_writes_safetensors(tmp_path: Path) -> None:
    net = create_arch("cifar_resnet20", num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "ckpt.pt")
    out = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(app, ["models", "convert", str(tmp_path / "ckpt.pt"), str(out)])
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(net.state_dict())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    result = CliRunner().invoke(app, ["models", "convert", str(tmp_path / "evil.pt"), str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2 and "weights_only" in result.stderr and "malicious" in result.stderr
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("command", [["protect"], ["revert"], ["models", "list"], ["models", "verify"], []])
def test_help_shows_examples(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.stdout


def _help_examples(command: list[str]) -> list[str]:
    """The examples of a command's help, each a paragraph joined into one line."""
    text = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"}).stdout
    lines = [line.strip() for line in text.split("Examples", 1)[1].splitlines()]
    paragraphs = " ".join(line or "\n" for line in lines).split("\n")  # blank lines end a paragraph
    examples = (" ".join(p.replace(" \\ ", " ").split()) for p in paragraphs)
    return [e for e in examples if e.startswith(("preempt ", "find "))]


@pytest.mark.parametrize("command", [[], ["protect"], ["revert"], ["eval"], ["keygen"], ["train"]])
def test_help_examples_find_the_models_they_name(command: list[str]) -> None:
    examples = _help_examples(command)
    assert examples
    for example in examples:
        # the development models live in ../shared/models, which no default search path covers
        if " cifar10-resnet" in example:
            assert "--models-dir ../shared/models" in example, example
        # the paper's models are RobustBench pickles, loadable once converted
        if "preact18" in example:
            assert "preempt models convert" in example, example
    if command in ([], ["protect"]):
        assert examples[0] == "preempt protect ./photos"  # the first example runs on a fresh install


def test_several_device_workers_split_the_inputs_once(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "one", n=5)
    _images(tmp_path / "two", n=5)
    # on the CPU both times: CUDA draws other noise than the CPU for the same seed
    single = run(["protect", str(tmp_path / "one"), *FAST[:-2], "--device", "cpu", "--labels", "backbone", "--json"],
                 registry)  # fmt: skip
    multi = run(["protect", str(tmp_path / "two"), *FAST[:-2], "--device", "cpu,cpu", "--labels", "backbone",
                 "--json"], registry)  # fmt: skip
    assert single.exit_code == 0 and multi.exit_code == 0, multi.output
    rows = [json.loads(line) for line in multi.stdout.splitlines()]
    assert sorted(Path(r["input"]).name for r in rows) == [f"img{i}.png" for i in range(5)]
    assert all(r["status"] == "done" for r in rows)
    # each image is written once, and bit-identical to the single-worker output (noise is per image)
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "one" / f"img{i}.protected.png"))
        b = np.asarray(Image.open(tmp_path / "two" / f"img{i}.protected.png"))
        assert np.array_equal(a, b)
    again = run(["protect", str(tmp_path / "two"), *FAST[:-2], "--device", "cpu,cpu", "--labels", "backbone",
                 "--json"], registry)  # fmt: skip
    assert {json.loads(line)["status"] for line in again.stdout.splitlines()} == {"skipped"}
    bad = run(["protect", str(tmp_path / "two"), "-b", "tiny-key", "--device", "cuda:0,cuda:0", "--labels", "backbone"],
              registry)  # fmt: skip
    assert bad.exit_code == 2


def test_resolve_devices() -> None:
    from preempt_cli.device import resolve_devices
    from preempt_cli.errors import ConfigError

    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert resolve_devices("cpu, cpu") == [torch.device("cpu")] * 2
    if not torch.cuda.is_available():
        assert resolve_devices("all") == [torch.device("cpu")]
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_devices("cuda:0,cuda:1")
    with pytest.raises(ConfigError):
        resolve_devices(" , ")


def test_device_all_without_a_gpu_says_it_computes_on_the_cpu(tmp_path: Path, registry: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``--device all`` (every GPU) on a node whose GPUs CUDA cannot see (a driver gone, CUDA_VISIBLE_DEVICES
    empty, a CPU-only torch) computed on the CPU without a word: a run meant for 8 GPUs went on at a CPU's
    pace. It still falls back to the CPU (``PREEMPT_DEVICE=all`` serves any machine), and says so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _images(tmp_path / "in", n=1)
    fell_back = run(["protect", str(tmp_path / "in"), *FAST[:-2], "--device", "all", "--labels", "backbone"], registry)
    assert fell_back.exit_code == 0, fell_back.output
    notes = [line for line in fell_back.stderr.splitlines() if "--device all" in line]
    assert len(notes) == 1 and "no GPU" in notes[0] and "CPU" in notes[0], fell_back.stderr
    quiet = run(["protect", str(tmp_path / "in"), *FAST[:-2], "--device", "all", "--labels", "backbone", "-q",
                 "--overwrite"], registry)  # fmt: skip
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_out_of_memory_halves_the_batch_after_freeing_the_failed_attempt(tmp_path: Path, tiny_backbone,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import weakref

    from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs

    _images(tmp_path / "in", n=8)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2))
    real_compute = Protector._compute
    failed: list[weakref.ref] = []

    def compute(self: Protector, batch: list) -> list:
        # what a failed attempt held (its activations) must be gone before the retry starts
        assert all(ref() is None for ref in failed), "retried while the failed attempt's tensors were alive"
        if len(batch) > 2:
            activations = torch.empty(1024)
            failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_compute(self, batch)

    monkeypatch.setattr(Protector, "_compute", compute)
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", batch_size=8)))
    assert [r.status for r in results] == ["done"] * 8
    assert len(failed) == 3  # 8 -> 4 + 4 -> (2 + 2) + (2 + 2)
    assert protector._batch_cap[(3, 32, 32)] == 2


def test_a_batch_size_that_ran_out_of_memory_is_never_allowed_again(tmp_path: Path, tiny_backbone,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs

    _images(tmp_path / "in", n=8)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2))
    real_compute = Protector._compute
    sizes: list[int] = []
    # memory that comes and goes (another batch in flight, another process): the first three attempts run out
    # of it, down to a batch of 2, and so does the second half's first attempt, a batch of 4, later
    out_of_memory_at = {0, 1, 2, 6}

    def compute(self: Protector, batch: list) -> list:
        sizes.append(len(batch))
        if len(sizes) - 1 in out_of_memory_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_compute(self, batch)

    monkeypatch.setattr(Protector, "_compute", compute)
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", batch_size=8)))
    assert [r.status for r in results] == ["done"] * 8
    assert sizes[:7] == [8, 4, 2, 1, 1, 2, 4]
    # a batch of 2 ran out of memory: the later failure of a batch of 4 must not allow 2 again
    assert protector._batch_cap[(3, 32, 32)] == 1


def test_a_batch_that_runs_out_of_memory_midway_writes_the_bits_of_a_run_that_did_not(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import ForeBackConfig, Protector, RunOptions, collect_inputs
    from preempt_cli.engine import FastPreemption

    # images at the backbone's input size (hashed noise) and photos it resizes (a generator per sample,
    # whose streams a failed attempt has advanced by a step)
    _images(tmp_path / "in" / "small", n=4)
    _images(tmp_path / "in" / "large", n=4, size=(48, 40), seed=1)
    config = ForeBackConfig(samples=3)

    def outputs(folder: str) -> dict[str, bytes]:
        protector = Protector(tiny_backbone, labels="backbone", config=config)
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / folder)))
        assert [r.status for r in results] == ["done"] * 8
        return {p.name: p.read_bytes() for p in (tmp_path / folder).rglob("*.png")}

    expected = outputs("plain")
    real_loss_grad = FastPreemption._loss_grad
    passes = {"several images": 0}

    def loss_grad(self: FastPreemption, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        if xs.shape[0] > config.samples:  # every pass of a batch of several images, after its first step
            passes["several images"] += 1
            if passes["several images"] % 2 == 0:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss_grad(self, xs, ys)

    monkeypatch.setattr(FastPreemption, "_loss_grad", loss_grad)
    assert outputs("retried") == expected
    assert passes["several images"] >= 4  # both sizes ran out of memory midway


def _out_of_memory_alone(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """``Protector._compute`` runs out of GPU memory for every batch holding the file ``name``, even alone (a
    photo the device cannot hold, in a batch of smaller ones); the sizes of the batches computed, in order."""
    from preempt_cli import Protector

    real_compute = Protector._compute
    sizes: list[int] = []

    def compute(self: Protector, batch: list) -> object:
        sizes.append(len(batch))
        if any(p.item.path.name == name for p in batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_compute(self, batch)

    monkeypatch.setattr(Protector, "_compute", compute)
    return sizes


@pytest.mark.parametrize(("kind", "io"), [("protect", "threads"), ("protect", "processes"), ("revert", "threads")])
def test_an_image_out_of_memory_even_alone_fails_alone_and_its_batch_is_written(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch, kind: str, io: str) -> None:  # fmt: skip
    """A batch that ran out of GPU memory is halved down to single images; one image that ran out of it even
    alone failed every file of its batch, the other half's, computed already, with it (8 files failed for
    one). It fails alone; the others are written, bit for bit as in a run where nothing ran out of memory."""
    from preempt_cli import ForeBackConfig, Protector, Reverter, collect_inputs

    originals = _images(tmp_path / "in", n=8)
    before = _digest(originals)
    cls = Reverter if kind == "revert" else Protector

    def outputs(folder: str) -> tuple[list, dict[str, bytes]]:
        items = collect_inputs([tmp_path / "in"], skip_markers=cls.skip_markers)
        with cls(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as runner:
            results = list(runner.run(items, RunOptions(out_dir=tmp_path / folder, batch_size=8, io=io, workers=2)))
        return results, {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}

    _, expected = outputs("plain")
    sizes = _out_of_memory_alone(monkeypatch, "img2.png")
    results, written = outputs("short")
    assert sizes == [8, 4, 2, 2, 1, 1, 4]  # 8 -> img0-3 -> img0-1, img2-3 -> img2 alone, img3; then img4-7
    by_name = {r.input.name: r for r in results}
    assert len(results) == 8 and by_name["img2.png"].status == "failed"
    assert by_name["img2.png"].reason.startswith("out of GPU memory even alone (32x32 pixels): ")
    assert "--device cpu" in by_name["img2.png"].reason and "--max-pixels" in by_name["img2.png"].reason
    assert all(r.status == "done" for name, r in by_name.items() if name != "img2.png")
    suffix = cls.run_options(RunOptions()).suffix
    assert written == {k: v for k, v in expected.items() if k != f"img2{suffix}.png"}  # no temporary file either
    assert len(expected) == 8 and _digest(originals) == before


def test_protect_exits_1_naming_the_one_image_out_of_memory_even_alone(
        tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    originals = _images(tmp_path / "in", n=4)
    args = [*FAST, "--labels", "backbone", "--batch-size", "4", "--io", "threads"]
    assert run(["protect", str(tmp_path / "in"), *args, "--out-dir", str(tmp_path / "plain")], registry).exit_code == 0
    _out_of_memory_alone(monkeypatch, "img1.png")
    result = run(["protect", str(tmp_path / "in"), *args, "--out-dir", str(tmp_path / "short")], registry)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {originals[1]}: out of GPU memory even alone (32x32 pixels): free GPU memory or use "
                      "another device (--device cpu); a lower --max-pixels refuses images this large before they are "
                      "computed"]  # fmt: skip
    assert "Protected 3, skipped 0, failed 1 in" in result.stderr
    written = sorted(p.name for p in (tmp_path / "short").iterdir())
    assert written == ["img0.protected.png", "img2.protected.png", "img3.protected.png"]  # no temporary file
    assert all((tmp_path / "short" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes() for name in written)


def test_no_fsync_writes_the_same_files_and_empty_outputs_are_redone(tmp_path: Path, registry: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import os

    _images(tmp_path / "a", n=2)
    _images(tmp_path / "b", n=2)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    # on I/O threads, where this process sees the calls (--io auto picks worker processes on a GPU)
    threads = ["--labels", "backbone", "--io", "threads"]
    assert run(["protect", str(tmp_path / "a"), *FAST, *threads], registry).exit_code == 0
    assert len(synced) == 2  # one flush per output by default
    assert run(["protect", str(tmp_path / "b"), *FAST, *threads, "--no-fsync"], registry).exit_code == 0
    assert len(synced) == 2
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "a" / f"img{i}.protected.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / f"img{i}.protected.png")))
    # an empty output (what a power loss can leave without fsync) is redone, not skipped as finished
    (tmp_path / "b" / "img0.protected.png").write_bytes(b"")
    again = run(["protect", str(tmp_path / "b"), *FAST, "--labels", "backbone", "--json"], registry)
    status = {Path(r["input"]).name: r["status"] for r in map(json.loads, again.stdout.splitlines())}
    assert status == {"img0.png": "done", "img1.png": "skipped"}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "img0.protected.png")),
                          np.asarray(Image.open(tmp_path / "a" / "img0.protected.png")))  # fmt: skip


def test_io_in_processes_writes_what_threads_write(tmp_path: Path, registry: Path) -> None:
    for name in ("threads", "processes"):
        _images(tmp_path / name, n=5)
        (tmp_path / name / "broken.png").write_bytes(b"not a png")
    rows = {}
    for name in ("threads", "processes"):
        result = run(["protect", str(tmp_path / name), *FAST, "--labels", "backbone", "--io", name, "--workers", "2",
                      "--json"], registry)  # fmt: skip
        assert result.exit_code == 1, result.output  # the broken file fails alone
        rows[name] = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["threads"].keys() == rows["processes"].keys()
    for file, r in rows["threads"].items():
        assert r["status"] == rows["processes"][file]["status"] and r.get("reason") == rows["processes"][file].get("reason")
    assert rows["processes"]["broken.png"]["status"] == "failed"
    for i in range(5):
        name = f"img{i}.protected.png"
        assert (tmp_path / "threads" / name).read_bytes() == (tmp_path / "processes" / name).read_bytes()
    with pytest.raises(ConfigError, match="--io"):
        RunOptions(io="fibers")


_IMPORTED_IN_WORKER = "sorted(m for m in ('torch', 'preempt_cli.cli', 'preempt_cli.protect') if m in __import__('sys').modules)"


def test_io_worker_processes_start_without_torch(tiny_backbone) -> None:
    from preempt_cli import Protector

    with Protector(tiny_backbone, labels="backbone") as protector:
        pool = protector._process_pool(RunOptions(io="processes", workers=1))
        assert pool.submit(eval, _IMPORTED_IN_WORKER).result(timeout=120) == []


def test_the_preempt_launcher_is_not_run_again_in_io_workers(tmp_path: Path) -> None:
    """pip's ``preempt`` launcher imports the CLI (and so torch): the I/O workers must not run it again."""
    import subprocess
    import sys

    launcher = tmp_path / "preempt"  # what pip writes for [project.scripts], plus a look into a worker
    launcher.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from preempt_cli.__main__ import main
if __name__ == "__main__":
    from preempt_cli.cli import _launched_as_the_package
    from conftest import make_tiny_model
    from preempt_cli import Protector, RunOptions
    _launched_as_the_package()  # what main() does first
    with Protector(make_tiny_model(0), labels="backbone") as protector:
        pool = protector._process_pool(RunOptions(io="processes", workers=1))
        print(pool.submit(eval, {_IMPORTED_IN_WORKER!r}).result(timeout=120))
    print(getattr(sys.modules["__main__"].__spec__, "name", None))
""")
    done = subprocess.run([sys.executable, str(launcher)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "preempt_cli.__main__"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal mask in /proc (Linux)")
def test_io_worker_processes_start_safe_from_an_early_ctrl_c(tmp_path: Path) -> None:
    """A Ctrl-C in a run's first second reaches the whole process group. The fork server started with
    SIGINT held (a press while Python started in it printed "Fatal Python error: init_import_site"), and a
    worker starting for a pool already closed fails quietly (a traceback of multiprocessing's internals)."""
    import subprocess
    import sys

    script = tmp_path / "start.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from multiprocessing import forkserver
from conftest import make_tiny_model
from preempt_cli import Protector, RunOptions

def held(pid):
    line = next(l for l in open(f"/proc/{{pid}}/status") if l.startswith("SigBlk:"))
    return bool(int(line.split()[1], 16) >> 1 & 1)  # bit 1: SIGINT (2)

def in_worker():
    import os, sys
    return sys.excepthook.__name__, held(os.getpid())

if __name__ == "__main__":  # the fork server imports this file too
    with Protector(make_tiny_model(0), labels="backbone") as protector:
        pool = protector._process_pool(RunOptions(io="processes", workers=1))
        print(held(forkserver._forkserver._forkserver_pid), held("self"), *pool.submit(in_worker).result(timeout=120))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # held in the fork server; let go in this process and (start_io_worker) in the workers
    assert done.stdout.split() == ["True", "False", "quiet_for_a_closed_pool", "False"]


def test_a_worker_started_for_a_closed_pool_fails_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    """What such a worker meets: the pool's semaphore, released by its owner before the worker opened it."""
    import gc
    import multiprocessing
    import pickle
    from multiprocessing import context

    from preempt_cli.imageio import quiet_for_a_closed_pool

    lock = multiprocessing.get_context("forkserver").Lock()
    context.set_spawning_popen(object())  # as when a process object is sent to a new worker
    try:
        sent = pickle.dumps(lock)
    finally:
        context.set_spawning_popen(None)
    del lock
    gc.collect()  # the owner lets go of it (unlinked)
    errors = []
    for payload in (sent, b"not a pickle"):
        try:
            pickle.loads(payload)
        except Exception as e:
            errors.append(e)
    assert isinstance(errors[0], FileNotFoundError)
    quiet_for_a_closed_pool(type(errors[0]), errors[0], errors[0].__traceback__)
    assert capsys.readouterr().err == ""
    quiet_for_a_closed_pool(type(errors[1]), errors[1], errors[1].__traceback__)  # any other: printed
    assert "Traceback" in capsys.readouterr().err


def test_files_hold_what_the_tensor_api_gives_their_batch(tmp_path: Path, tiny_backbone) -> None:
    """The file pipeline (integer levels sent to the device in one batch, rounded there) writes exactly
    what the tensor API gives the same batch, for 8-bit colour, for a batch mixing 8- and 16-bit gray, and
    for a batch of 16-bit gray alone (its levels travel as int32, scaled by 65535)."""
    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.imageio import quantize, read_image
    from preempt_cli.protect import content_seed

    rng = np.random.default_rng(7)
    write_random_pngs(tmp_path / "in" / "rgb", n=3)
    gray = tmp_path / "in" / "gray"
    gray.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(gray / f"g8-{i}.png")
        Image.fromarray(rng.integers(0, 65536, (32, 32), dtype=np.uint16)).save(gray / f"g16-{i}.png")
    deep = tmp_path / "in" / "deep"  # another size, so a batch of its own: 16-bit only
    deep.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(deep / f"d16-{i}.png")
    items = collect_inputs([tmp_path / "in"])
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2), seed=4)
    results = list(protector.run(items, RunOptions(out_dir=tmp_path / "out", batch_size=64, workers=2)))
    assert [r.status for r in results] == ["done"] * 9

    written = {r.input: read_image(r.output) for r in results}
    depths = {"rgb": {np.dtype("uint8")}, "gray": {np.dtype("uint8"), np.dtype("uint16")}, "deep": {np.dtype("uint16")}}
    for folder in ("rgb", "gray", "deep"):  # one batch each, in the order the files were found
        pictures = [read_image(i.path) for i in items if i.path.parent.name == folder]
        assert {p.color.dtype for p in pictures} == depths[folder]
        x = torch.stack([p.to_tensor() for p in pictures]).to(TEST_DEVICE)
        y = protector.predict(x).clone()
        out = protector.transform(x, y, noise_seeds=[content_seed(p.color) for p in pictures])
        for i, picture in enumerate(pictures):
            expected = quantize(out[i], picture.color, protector.config.eps)
            got = written[picture.path].color
            assert got.dtype == picture.color.dtype and np.array_equal(got, expected), picture.path.name


def test_a_run_freezes_the_long_lived_objects_while_it_goes_on(tmp_path: Path, tiny_backbone, monkeypatch) -> None:
    import gc

    from preempt_cli import ForeBackConfig, Protector, collect_inputs, protect

    write_random_pngs(tmp_path / "in", n=2)
    assert gc.get_freeze_count() == 0  # as the runs of the tests before left it
    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(a) or 0)
    for rerun in (False, True):
        frozen_during = [gc.get_freeze_count() for _ in Protector(
            tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)).run(
            collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", overwrite=rerun))]
        assert min(frozen_during) > 0 and gc.get_freeze_count() == 0
    assert protect._garbage_collected_once and len(collected) <= 1  # one full collection per process at most


@pytest.mark.parametrize("queued", [1, 2])
def test_batches_queued_on_the_device_before_the_previous_is_waited_for_write_the_same_files(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch, queued: int) -> None:  # fmt: skip
    """With 2 batches queued (what a GPU gets), the next batch is launched while the previous one is
    still on the device, and the files are those of batches computed one at a time."""
    import threading
    import time

    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.imageio import read_image

    write_random_pngs(tmp_path / "in", n=12, name="img{i:02d}.png")
    items = collect_inputs([tmp_path / "in"])
    events: list[tuple[str, int]] = []
    threads: set[str] = set()
    launch, finish = Protector._compute_with_backoff, Protector._finish_batch
    device = StandInDevice(0.3)  # each batch 0.3 s on the device, after the one queued before it

    def slow_launch(self: Protector, batch: list) -> QueuedWork:
        threads.add(threading.current_thread().name)
        events.append(("launch", int(batch[0].item.path.stem[3:])))
        return device.queue(payload=launch(self, batch))

    def slow_finish(self: Protector, batch: list, work: QueuedWork) -> list:
        device.wait(work)
        events.append(("finish", int(batch[0].item.path.stem[3:])))
        return finish(self, batch, work.payload)

    monkeypatch.setattr(Protector, "_compute_with_backoff", slow_launch)
    monkeypatch.setattr(Protector, "_finish_batch", slow_finish)
    monkeypatch.setattr(Protector, "_queued_batches", lambda self: queued)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        start = time.perf_counter()
        results = list(protector.run(items, RunOptions(out_dir=tmp_path / "out", batch_size=4, workers=2)))
        wall = time.perf_counter() - start
    assert [r.status for r in results] == ["done"] * 12 and len(threads) == 1
    # each file's seconds are its share of its batch's time: together, no more than the run took
    assert 0.8 <= sum(r.seconds for r in results) <= wall  # 3 batches of 0.3 s on the device
    assert [e for e in events if e[0] == "launch"] == [("launch", 0), ("launch", 4), ("launch", 8)]
    if queued == 2:  # each later batch launched while the one before it was on the device
        assert events.index(("launch", 4)) < events.index(("finish", 0))
        assert events.index(("launch", 8)) < events.index(("finish", 4))
    else:
        assert events == [(kind, i) for i in (0, 4, 8) for kind in ("launch", "finish")]
    monkeypatch.undo()
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        plain = list(protector.run(items, RunOptions(out_dir=tmp_path / "plain", batch_size=4, workers=2)))
    assert [r.status for r in plain] == ["done"] * 12
    for r in plain:
        other = tmp_path / "out" / r.output.name
        assert np.array_equal(read_image(r.output).color, read_image(other).color), r.output.name


def test_a_cpu_computes_one_batch_at_a_time(tiny_backbone) -> None:
    from preempt_cli import Protector

    assert Protector(tiny_backbone, labels="backbone")._queued_batches() == (2 if TEST_DEVICE.type == "cuda" else 1)


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_the_first_and_last_batches_go_in_pieces_that_write_what_whole_batches_would(
        tmp_path: Path, tiny_backbone, io: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The run's first batch is computed in up to 4 pieces, each as soon as its files are decoded (the
    device starts early), and so is its last (their files are written while the next piece computes); the
    files are those of a run that computes whole batches."""
    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.imageio import read_image

    write_random_pngs(tmp_path / "in", n=48)
    items = collect_inputs([tmp_path / "in"])
    written: dict[int, dict[str, np.ndarray]] = {}
    for min_piece in (4, 1000):  # pieces of 4 images; none
        monkeypatch.setattr(protect, "_MIN_PIECE", min_piece)
        sizes: list[int] = []
        real = Protector._compute

        def compute(self: Protector, batch: list, sizes: list[int] = sizes) -> list:
            sizes.append(len(batch))
            return real(self, batch)

        monkeypatch.setattr(Protector, "_compute", compute)
        with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
            out = tmp_path / f"out{min_piece}"
            results = list(protector.run(items, RunOptions(out_dir=out, batch_size=16, io=io, workers=2)))
        assert [r.status for r in results] == ["done"] * 48
        assert sizes == ([4, 4, 4, 4, 16, 4, 4, 4, 4] if min_piece == 4 else [16, 16, 16])
        written[min_piece] = {p.name: read_image(p).color for p in out.glob("*.png")}
        monkeypatch.setattr(Protector, "_compute", real)
    assert len(written[4]) == 48 and written[4].keys() == written[1000].keys()
    assert all(np.array_equal(written[4][name], written[1000][name]) for name in written[4])


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_photos_are_decoded_only_as_far_ahead_as_their_bytes_allow(
        tmp_path: Path, tiny_backbone, io: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Files are decoded ahead of the device by their bytes, not 64 whatever their size: a folder of
    12-megapixel photos held 2.3 GB of decoded files waiting while a CPU computed one photo a minute.
    Here the bound is lowered to two of these photos' worth, and a batch is one photo."""
    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    write_random_pngs(tmp_path / "in", n=10, size=(128, 128), name="img{i:02d}.png")
    monkeypatch.setattr(protect, "_DECODED_AHEAD_BYTES", 2 * 128 * 128 * 3, raising=False)
    submitted, finished, held = 0, 0, []  # files sent to be decoded; files computed; files held per batch
    chunks = []  # files per decode call (a worker process's chunk)

    def counted(decode):
        def decode_counted(self, items: list) -> list:
            nonlocal submitted
            submitted += len(items)
            chunks.append(len(items))
            return decode(self, items)

        return decode_counted

    for io_class in (protect._ThreadIO, protect._ProcessIO):
        monkeypatch.setattr(io_class, "decode", counted(io_class.decode))
    real_compute = Protector._compute

    def compute(self: Protector, batch: list) -> list:  # on a CPU a batch computes here, one after another
        nonlocal finished
        held.append(submitted - finished)  # decoding or decoded, waiting, and this batch's
        out = real_compute(self, batch)
        finished += len(batch)
        return out

    monkeypatch.setattr(Protector, "_compute", compute)
    monkeypatch.setattr(Protector, "transform_levels", lambda self, levels, max_value, y, noise_seeds=None:
                        levels_to_float(levels, max_value))  # the pipeline's test
    # 20 samples of 128x128: one photo per batch
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=20)) as protector:
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io=io,
                                                                                  workers=2, fsync=False)))  # fmt: skip
    assert [r.status for r in results] == ["done"] * 10 and len(held) == 10
    # two decoded ahead, this batch and two queued behind it (the batches the device holds, and one more)
    assert max(held) <= 5, held
    # the two files the bound allows go one to each worker, decoded at once: a chunk of both went to one
    # worker process, which decoded them one after the other while the other idled (the device waiting)
    assert max(chunks) == 1, chunks


class _CountedDecode:
    """A file's decode handle (a thread's future, a worker's part) that notes when the pipeline takes it."""

    def __init__(self, handle, taken) -> None:
        self.handle, self.taken, self.future = handle, taken, getattr(handle, "future", handle)

    def done(self) -> bool:
        return self.handle.done()

    def result(self):
        self.taken()
        return self.handle.result()


def _count_decoded_ahead(monkeypatch: pytest.MonkeyPatch, cost) -> list[tuple[int, int]]:
    """Patch both I/O modes' decode to note, after each queueing, the bytes (``cost(path)``) and the number
    of files queued for decoding and not yet taken by the pipeline: the list returned."""
    import preempt_cli.protect as protect

    ahead: dict[str, int] = {}
    seen: list[tuple[int, int]] = []

    def counted(decode):
        def decode_counted(self, items: list) -> list:
            handles = decode(self, items)
            for item, _ in items:
                ahead[str(item.path)] = cost(item.path)
            seen.append((sum(ahead.values()), len(ahead)))
            return [_CountedDecode(h, lambda name=str(item.path): ahead.pop(name))
                    for h, (item, _) in zip(handles, items)]  # fmt: skip

        return decode_counted

    for io_class in (protect._ThreadIO, protect._ProcessIO):
        monkeypatch.setattr(io_class, "decode", counted(io_class.decode))
    return seen


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_the_bytes_decoded_ahead_are_bounded_whatever_the_order_of_sizes(
        tmp_path: Path, tiny_backbone, io: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The files decoded ahead of the device are bounded by their bytes, known from their headers before they
    are queued: in 0.23.0 the bound followed the latest image decoded, so after a run of small images the
    files queued (up to 64) could all be photos, decoded at once (2.3 GB of 12-megapixel photos). Here 40
    small images come before 12 larger ones, and the bound is lowered to four of the larger ones' bytes."""
    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    write_random_pngs(tmp_path / "in", n=40, size=(32, 32), name="a{i:02d}.png")
    write_random_pngs(tmp_path / "in", n=12, size=(96, 96), name="b{i:02d}.png", seed=1)
    large = 96 * 96 * 3
    monkeypatch.setattr(protect, "_DECODED_AHEAD_BYTES", 4 * large)
    seen = _count_decoded_ahead(monkeypatch, lambda path: large if path.name.startswith("b") else 32 * 32 * 3)
    monkeypatch.setattr(Protector, "transform_levels", lambda self, levels, max_value, y, noise_seeds=None:
                        levels_to_float(levels, max_value))  # the pipeline's test
    # 20 samples: 16 small images a batch (two batches of them: 96 KiB, within the bound), one large one
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=20)) as protector:
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io=io,
                                                                                  workers=2, fsync=False)))  # fmt: skip
    assert [r.status for r in results] == ["done"] * 52
    assert max(held for held, _ in seen) <= 4 * large, seen
    assert max(files for _, files in seen) > 4  # small images still decode many at once


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_files_past_the_decode_ahead_bound_still_go_two_batches_ahead(
        tmp_path: Path, tiny_backbone, io: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """However large the files, two batches of them are decoded ahead (with a batch of one image, two files),
    never more; files whose headers cannot be read fail as before, each on its own line, the run going on."""
    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.imageio import read_images

    write_random_pngs(tmp_path / "in", n=3, size=(64, 48), name="a{i}.png")
    (tmp_path / "in" / "b_garbage.png").write_bytes(b"not an image" * 20)
    (tmp_path / "in" / "c_empty.png").write_bytes(b"")
    write_random_pngs(tmp_path / "in", n=2, size=(48, 64), name="d{i}.png", seed=1)
    monkeypatch.setattr(protect, "_DECODED_AHEAD_BYTES", 1)
    seen = _count_decoded_ahead(monkeypatch, lambda path: 0 if path.name[0] in "bc" else 64 * 48 * 3)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        # batch_size 1 at the backbone's 32x32: one of these images a batch
        options = RunOptions(out_dir=tmp_path / "out", io=io, workers=2, fsync=False, batch_size=1)
        results = list(protector.run(collect_inputs([tmp_path / "in"]), options))
    failed = [(r.input.name, r.reason) for r in results if r.status == "failed"]
    expected = [(name, read_images([str(tmp_path / "in" / name)])[0]) for name in ("b_garbage.png", "c_empty.png")]
    assert failed == expected
    assert sorted(r.input.name for r in results if r.status == "done") == ["a0.png", "a1.png", "a2.png", "d0.png",
                                                                           "d1.png"]  # fmt: skip
    # two batches of one image each may wait: the bound never holds fewer
    assert max(held for held, _ in seen) <= 2 * 64 * 48 * 3, seen


def _count_pending_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch both I/O modes' write to note, after each batch's writes join the pipeline's queue, how many
    writes that queue holds (their results not yet taken): the list returned."""
    import preempt_cli.protect as protect

    seen: list[int] = []

    def counted(write):
        def write_counted(self, jobs: list, *rest) -> None:
            write(self, jobs, *rest)
            seen.append(len(rest[-1]))  # the queue the handles were put into

        return write_counted

    for io_class in (protect._ThreadIO, protect._ProcessIO):
        monkeypatch.setattr(io_class, "write", counted(io_class.write))
    return seen


@pytest.mark.parametrize("io", ["threads", "processes"])
@pytest.mark.parametrize("bound_files", [3, 0])
def test_the_outputs_waiting_to_be_written_are_bounded_by_their_bytes(
        tmp_path: Path, tiny_backbone, io: str, bound_files: int, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A device faster than the PNG encoders (a GPU with photos) left every batch it computed waiting to be
    written, its outputs in memory (2 GB for 16 photos). The writes pending are now bounded by their bytes:
    the oldest are waited for before more join them; one batch's writes may still wait while the next is
    computed (a bound below one batch: two batches pending, never more). Results come in the files' order."""
    from functools import partial

    import _write_faults

    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    write_random_pngs(tmp_path / "in", n=10, size=(64, 48), name="a{i}.png")
    held = 2 * 64 * 48 * 3  # an output's levels and its picture's
    monkeypatch.setattr(protect, "_WRITES_PENDING_BYTES", bound_files * held)
    monkeypatch.setattr(protect, "write_pngs", partial(_write_faults.write_pngs_slowly, 0.2, None))
    monkeypatch.setattr(Protector, "transform_levels", lambda self, levels, max_value, y, noise_seeds=None:
                        levels_to_float(levels, max_value))  # a device that keeps up
    seen = _count_pending_writes(monkeypatch)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        # batch_size 1 at the backbone's 32x32: one of these images a batch
        options = RunOptions(out_dir=tmp_path / "out", io=io, workers=2, fsync=False, batch_size=1)
        results = list(protector.run(collect_inputs([tmp_path / "in"]), options))
    assert [(r.input.name, r.status) for r in results] == [(f"a{i}.png", "done") for i in range(10)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"a{i}.protected.png" for i in range(10)]
    assert max(seen) <= max(bound_files, 2), seen
    if bound_files == 0:  # a batch is still written while the next one computes
        assert max(seen) == 2, seen


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("io", ["threads", "processes"])
def test_an_interrupt_while_waiting_for_the_writes_still_writes_the_batch_computed(
        tmp_path: Path, tiny_backbone, io: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ctrl-C while the run waits for the oldest writes before writing a computed batch (the writes pending
    at their bound): that batch is still written and reported, as one the device had finished always was;
    every output on disk is in the results."""
    import threading
    from functools import partial

    import _write_faults

    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    write_random_pngs(tmp_path / "in", n=8, size=(32, 32), name="a{i}.png")
    gate = tmp_path / "writes may go"
    monkeypatch.setattr(protect, "_WRITES_PENDING_BYTES", 1)  # two batches' writes pending at most
    monkeypatch.setattr(protect, "write_pngs", partial(_write_faults.write_pngs_slowly, 0, str(gate)))
    started = []
    third_done = threading.Event()

    def counted_transform(self, levels, max_value, y, noise_seeds=None):
        started.append(levels.shape[0])
        if len(started) == 4:  # the third batch is computed: the run waits for the writes to take it
            third_done.set()
        return levels_to_float(levels, max_value)

    monkeypatch.setattr(Protector, "transform_levels", counted_transform)

    # the writes go on once the run has taken the interrupt
    deadline = interrupt_run_once(third_done, gate.touch, monkeypatch, deadline=20, after=0.5)
    results = []
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        options = RunOptions(out_dir=tmp_path / "out", io=io, workers=2, fsync=False, batch_size=1)
        with pytest.raises(KeyboardInterrupt):
            for result in protector.run(collect_inputs([tmp_path / "in"]), options):
                results.append(result)
    deadline.cancel()
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert all(r.status == "done" for r in results), [(r.status, r.reason) for r in results]
    # the two batches pending and the one waiting for them, at least
    assert len(results) >= 3 and written == sorted(r.output.name for r in results), (results, written)


def test_outputs_do_not_depend_on_the_decode_ahead_bound(tmp_path: Path, tiny_backbone,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Bounding the files decoded ahead by bytes changes when files are decoded and how they are batched (and
    bounding the writes pending, when batches are written), never an output: each image's noise comes from
    its own pixels."""
    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.imageio import read_image

    write_random_pngs(tmp_path / "in", n=20, size=(32, 32), name="a{i:02d}.png")
    write_random_pngs(tmp_path / "in", n=4, size=(80, 64), name="b{i}.png", seed=1)
    write_random_pngs(tmp_path / "in", n=6, size=(32, 32), name="c{i}.png", seed=2)
    written = []
    for bound in (protect._DECODED_AHEAD_BYTES, 80 * 64 * 3):
        monkeypatch.setattr(protect, "_DECODED_AHEAD_BYTES", bound)
        monkeypatch.setattr(protect, "_WRITES_PENDING_BYTES", bound)
        out = tmp_path / f"out{bound}"
        with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
            results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=out, workers=2,
                                                                                      fsync=False)))  # fmt: skip
        assert [r.status for r in results] == ["done"] * 30
        written.append({p.name: read_image(p).color for p in out.glob("*.png")})
    assert written[0].keys() == written[1].keys() and len(written[0]) == 30
    assert all(np.array_equal(written[0][name], written[1][name]) for name in written[0])


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_a_failing_batch_fails_its_files_and_the_run_goes_on(tmp_path: Path, tiny_backbone, io: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    _images(tmp_path / "in" / "small", n=3, size=(32, 32))
    _images(tmp_path / "in" / "large", n=2, size=(48, 40))  # another size: a batch of its own
    real_compute = Protector._compute

    def compute(self: Protector, batch: list) -> list:
        if batch[0].picture.size == (48, 40):
            raise RuntimeError("boom")
        return real_compute(self, batch)

    monkeypatch.setattr(Protector, "_compute", compute)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io=io,
                                                                                  workers=2)))  # fmt: skip
    by_folder = {(r.input.parent.name, r.status) for r in results}
    assert by_folder == {("small", "done"), ("large", "failed")} and len(results) == 5
    assert all(r.reason == "processing failed: RuntimeError: boom" for r in results if r.status == "failed")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == [f"img{i}.protected.png" for i in range(3)]
    assert protector._processes is None  # closed on leaving the with block


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_an_output_that_cannot_be_written_fails_its_file_alone(tmp_path: Path, tiny_backbone, io: str) -> None:
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    _images(tmp_path / "in" / "ok", n=2)
    _images(tmp_path / "in" / "blocked", n=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "blocked").write_text("a file where the output folder would go")
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io=io,
                                                                                  workers=2)))  # fmt: skip
    by_folder = {r.input.parent.name: [] for r in results}
    for r in results:
        by_folder[r.input.parent.name].append(r)
    assert [r.status for r in by_folder["ok"]] == ["done"] * 2
    assert [r.status for r in by_folder["blocked"]] == ["failed"] * 2
    # known before their compute: the output folder is probed
    assert all(r.reason == f"output {tmp_path / 'out' / 'blocked' / r.input.name.replace('.png', '.protected.png')}: "
                           f"not attempted: {tmp_path / 'out' / 'blocked'} is a file, not a folder" and r.output is None
               for r in by_folder["blocked"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out" / "ok").iterdir()) == ["img0.protected.png", "img1.protected.png"]


def test_a_file_that_appears_where_an_output_folder_goes_fails_its_files_by_name(tmp_path: Path, tiny_backbone,
                                                                               monkeypatch) -> None:  # fmt: skip
    """A file that appears where an output folder goes after the folder was probed (another process) failed
    each of its files with "cannot write: File exists", mkdir's errno EEXIST, which the run took for another
    run having written the output first. The reason names the folder and the file in the way."""
    from preempt_cli import ForeBackConfig, Protector, collect_inputs, protect

    _images(tmp_path / "in" / "blocked", n=2)
    blocked = tmp_path / "out" / "blocked"
    blocked.parent.mkdir()
    blocked.write_text("a file where the output folder would go")
    monkeypatch.setattr(protect, "folder_write_problem", lambda path: None)  # the probe came before the file
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        options = RunOptions(out_dir=tmp_path / "out", io="threads", workers=2)
        results = list(protector.run(collect_inputs([tmp_path / "in"]), options))
    assert [r.status for r in results] == ["failed"] * 2
    assert all(r.reason == f"output {blocked / r.input.name.replace('.png', '.protected.png')}: cannot create folder "
                           f"{blocked}: {blocked} is a file, not a folder" and r.output is None
               for r in results)  # fmt: skip
    assert blocked.read_text() == "a file where the output folder would go"


def _fail_writes_in(monkeypatch: pytest.MonkeyPatch, folders: list[Path], io: str, error_number: int,
                    marker: Path) -> None:  # fmt: skip
    """Writes of outputs in ``folders`` fail with ``OSError(error_number)`` (see ``_write_faults``), on I/O
    threads or in I/O worker processes; each failure creates ``marker``."""
    from functools import partial

    import _write_faults

    from preempt_cli import imageio, protect

    names = tuple(str(f) for f in folders)
    if io == "processes":  # the workers unpickle the function by name: a module of its own
        monkeypatch.setattr(protect, "write_pngs", partial(_write_faults.write_pngs_failing, names, error_number,
                                                           str(marker)))  # fmt: skip
    else:
        monkeypatch.setattr(imageio, "_png_in_temporary", _write_faults.failing_png_writes(
            names, error_number, imageio._png_in_temporary, str(marker)))  # fmt: skip


def _computed(monkeypatch: pytest.MonkeyPatch, failed_write: Path | None = None) -> list[Path]:
    """The inputs computed (``Protector._compute`` wrapped), in order. With ``failed_write``, the second batch
    is taken from the device only once a write has failed (that file exists) and half a second more: a
    batch outlasts a write, as it does with real models and images (tiny ones race the writes)."""
    from preempt_cli import Protector

    computed: list[Path] = []
    real_compute, real_finish = Protector._compute, Protector._finish_batch
    finished = [0]

    def compute(self: Protector, batch: list) -> object:
        computed.extend(p.item.path for p in batch)
        return real_compute(self, batch)

    def finish(self: Protector, batch: list, launched: object) -> object:
        finished[0] += 1
        if finished[0] == 2 and failed_write is not None:
            deadline = time.monotonic() + 60
            while not failed_write.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # the failure noted meanwhile
        return real_finish(self, batch, launched)

    monkeypatch.setattr(Protector, "_compute", compute)
    monkeypatch.setattr(Protector, "_finish_batch", finish)
    return computed


@pytest.mark.parametrize(("kind", "io"), [("protect", "threads"), ("protect", "processes"), ("revert", "threads")])
def test_after_a_write_finds_the_disk_full_its_file_system_s_files_fail_uncomputed(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch, kind: str, io: str) -> None:  # fmt: skip
    """A full disk failed every later file after its compute (100 CIFAR PNGs on a 500 KB tmpfs: 75 computed
    to fail "No space left on device"). After such a write, the files whose outputs lie on the same file
    system fail before they are computed, saying why; another file system's go on."""
    import errno

    import preempt_cli.protect as protect
    from preempt_cli import ForeBackConfig, Protector, Reverter, collect_inputs

    full, same, other = tmp_path / "in" / "a_full", tmp_path / "in" / "b_same_fs", tmp_path / "in" / "c_other_fs"
    originals = _images(full, n=16) + _images(same, n=3) + _images(other, n=3)
    before = _digest(originals)
    marker = tmp_path / "a-write-failed"
    _fail_writes_in(monkeypatch, [full], io, errno.ENOSPC, marker)
    real_file_system = protect._file_system_of
    monkeypatch.setattr(protect, "_file_system_of",
                        lambda folder: -1 if folder.name == "c_other_fs" else real_file_system(folder))  # fmt: skip
    computed = _computed(monkeypatch, failed_write=marker)
    cls = Reverter if kind == "revert" else Protector
    with cls(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as runner:
        results = list(runner.run(collect_inputs([tmp_path / "in"], skip_markers=cls.skip_markers),
                                  RunOptions(batch_size=1, io=io, workers=2)))  # fmt: skip
    by_folder: dict[str, list] = {}
    for r in results:
        by_folder.setdefault(r.input.parent.name, []).append(r)
    said = (f"not attempted: no space left on the file system of {full} (an earlier write there failed); free "
            "space and re-run")  # fmt: skip
    suffix = cls.run_options(RunOptions()).suffix

    def not_attempted(r) -> str:  # naming the file's own output, as a failed write does
        return f"output {r.input.with_name(r.input.stem + suffix + '.png')}: {said}"

    assert [r.status for r in by_folder["a_full"]] == ["failed"] * 16
    written = [r for r in by_folder["a_full"] if r.reason != not_attempted(r)]
    assert all(r.reason.startswith(f"output {full}") and r.reason.endswith(": cannot write: No space left on device")
               for r in written)  # fmt: skip
    # the first batch, and those taken into the compute before the failure was known: no more
    assert 1 <= len(written) <= 4 and sorted(p for p in computed if p.parent == full) == sorted(r.input for r in written)
    assert [(r.status, r.reason) for r in by_folder["b_same_fs"]] == [  # its st_dev is a_full's
        ("failed", not_attempted(r)) for r in by_folder["b_same_fs"]]
    assert [r.status for r in by_folder["c_other_fs"]] == ["done"] * 3 and all(r.output.is_file() for r in by_folder["c_other_fs"])
    assert not [p for p in computed if p.parent == same]
    assert _digest(originals) == before and not list(full.glob(".*.tmp"))  # originals kept, no temporary files


def test_protect_on_a_full_disk_reports_each_file_and_exits_1(tmp_path: Path, registry: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import errno

    _images(tmp_path / "full", n=6)
    marker = tmp_path / "a-write-failed"
    _fail_writes_in(monkeypatch, [tmp_path / "full"], "threads", errno.ENOSPC, marker)
    computed = _computed(monkeypatch, failed_write=marker)
    result = run(["protect", str(tmp_path / "full"), *FAST, "--labels", "backbone", "--batch-size", "1", "--io",
                  "threads", "--workers", "2"], registry)  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 6 and len(computed) <= 4  # one line a file; the rest not computed
    assert sum(line.endswith(f".protected.png: not attempted: no space left on the file system of {tmp_path / 'full'} "
                             "(an earlier write there failed); free space and re-run") for line in errors) == 6 - len(computed)  # fmt: skip
    assert "Protected 0, skipped 0, failed 6 in" in result.stderr


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_an_output_folder_that_cannot_take_a_file_fails_its_files_uncomputed(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch, io: str) -> None:  # fmt: skip
    """Outputs on a read-only file system: all 100 CIFAR PNGs were computed, then failed "Read-only file
    system". Each output folder is probed once, before any compute; its files fail unread, saying why."""
    import errno
    import tempfile

    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    locked, ok = tmp_path / "in" / "locked", tmp_path / "in" / "ok"
    originals = _images(locked, n=3) + _images(ok, n=2)
    before = _digest(originals)
    probes: dict[Path, int] = {}
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, dir: str | None = None, **kw: object) -> tuple[int, str]:  # noqa: A002
        if str(kw.get("prefix", "")).startswith(".preempt-write-test."):
            probes[Path(dir)] = probes.get(Path(dir), 0) + 1
        if dir is not None and Path(dir) == locked:  # as a read-only mount answers root too
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    computed = _computed(monkeypatch)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(batch_size=1, io=io, workers=2)))
    failed = sorted((r.input.name, r.reason) for r in results if r.status == "failed")
    assert failed == [(f"img{i}.png", f"output {locked / f'img{i}.protected.png'}: not attempted: no file can be "
                                      f"created in {locked} (Read-only file system)") for i in range(3)]  # fmt: skip
    assert sorted(r.input for r in results if r.status == "done") == sorted(computed) == originals[3:]
    assert probes == {locked: 1, ok: 1}  # once per output folder
    assert _digest(originals) == before


def test_the_devices_of_one_run_probe_each_output_folder_once(tmp_path: Path, tiny_backbone,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """run_on_devices: each device's run probed every output folder again (concurrently: a probe file per
    device in each folder), and learnt on its own that a file system was full (the others went on computing
    files to fail). The devices share what they find (a shared stop: see the white-box test below)."""
    import copy
    import errno
    import tempfile

    from preempt_cli import ForeBackConfig, Protector, collect_inputs
    from preempt_cli.protect import run_on_devices

    locked, ok = tmp_path / "in" / "locked", tmp_path / "in" / "ok"
    _images(locked, n=3)
    _images(ok, n=3)
    probes: dict[Path, int] = {}
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args: object, dir: str | None = None, **kw: object) -> tuple[int, str]:  # noqa: A002
        if str(kw.get("prefix", "")).startswith(".preempt-write-test."):
            probes[Path(dir)] = probes.get(Path(dir), 0) + 1
            time.sleep(0.05)  # the devices judge their shares at once
        if dir is not None and Path(dir) == locked:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    devices = [Protector(copy.deepcopy(tiny_backbone), labels="backbone", config=ForeBackConfig(samples=2))
               for _ in range(2)]  # fmt: skip
    results = list(run_on_devices(devices, collect_inputs([tmp_path / "in"]), RunOptions(batch_size=1, io="threads",
                                                                                         workers=2)))  # fmt: skip
    for device in devices:
        device.close()
    assert sorted((r.input.parent.name, r.status) for r in results) == [("locked", "failed")] * 3 + [("ok", "done")] * 3
    assert probes == {locked: 1, ok: 1}


def _two_devices(tiny_backbone) -> list:
    import copy

    from preempt_cli import ForeBackConfig, Protector

    return [Protector(copy.deepcopy(tiny_backbone), labels="backbone", config=ForeBackConfig(samples=1))
            for _ in range(2)]  # fmt: skip


def _device_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("preempt-device-")]


def _run_on_devices_in_a_thread(devices, paths, options) -> tuple[list, list]:
    """run_on_devices' results and what it raised, consumed on a thread that a hung run leaves behind
    (daemon) instead of hanging the tests."""
    import threading

    from preempt_cli.protect import run_on_devices

    results: list = []
    raised: list = []

    def consume() -> None:
        try:
            for result in run_on_devices(devices, collect_inputs(paths), options):
                results.append(result)
        except BaseException as e:  # noqa: B036  # what the run ends with, a Ctrl-C included
            raised.append(e)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=60)
    for device in devices:
        if not consumer.is_alive():
            device.close()
    assert not consumer.is_alive(), "run_on_devices hung"
    return results, raised


@pytest.mark.parametrize("kind", ["result", "the end"])
def test_an_interrupt_just_after_the_caller_has_a_device_s_message_loses_nothing(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:  # fmt: skip
    """run_on_devices: a Ctrl-C lands between any two steps of the caller's thread. queue.Queue.get took a
    message off before its notify() ran Python code, and an interrupt there lost the message: a result (a
    file on disk that stdout did not list), or a worker's "done", after which the run waited for good for a
    device that had ended (the "interrupt race in the queue wait"). A message is now taken off once handled,
    and the workers count their own end."""
    from preempt_cli.protect import _DeviceMessages

    fired: list = []
    real_oldest = _DeviceMessages.oldest

    def interrupted_after_reading(self):  # the handler's KeyboardInterrupt, just after the read
        message = real_oldest(self)
        if (message[0] if message is not None else "the end") == kind and not fired:
            fired.append(message)
            raise KeyboardInterrupt
        return message

    monkeypatch.setattr(_DeviceMessages, "oldest", interrupted_after_reading)
    write_random_pngs(tmp_path / "in", n=40, name="img{i:02d}.png")
    out = tmp_path / "out"
    devices = _two_devices(tiny_backbone)
    results, raised = _run_on_devices_in_a_thread(devices, [tmp_path / "in"],
                                                  RunOptions(out_dir=out, batch_size=2, io="threads", workers=2))  # fmt: skip
    assert fired and len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)
    on_disk = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert all(n.endswith(".protected.png") for n in on_disk)  # no temporary files
    assert sorted(r.output.name for r in results if r.status == "done") == on_disk
    assert not [r for r in results if r.status == "failed"]
    assert len(results) == 40 if kind == "the end" else len(results) < 40  # the run stopped mid-way
    assert not _device_threads()


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_kill"), reason="POSIX thread signals")
def test_a_ctrl_c_that_does_not_wake_the_caller_of_several_devices_is_taken_at_once(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """run_on_devices: the caller's thread waited for the devices' next message with no time limit, so a
    Ctrl-C that did not wake it (one that came just before it blocked, or that the kernel gave another of
    the process's threads) was taken only once a device's batch was done: no "stopping" for seconds on a
    CPU. Its wait now wakes every 0.1 s, as a single device's run does."""
    import signal
    import threading

    from preempt_cli import Protector
    from preempt_cli.protect import run_on_devices

    write_random_pngs(tmp_path / "in", n=4, name="img{i:02d}.png")
    devices = _two_devices(tiny_backbone)
    started, release = threading.Event(), threading.Event()
    real_transform = Protector.transform_levels

    def held_transform(self, *args, **kw):  # every device's batch: held until released
        started.set()
        release.wait(30)
        return real_transform(self, *args, **kw)

    monkeypatch.setattr(Protector, "transform_levels", held_transform)
    taken: list[float] = []

    def handler(signum, frame):  # runs where the main thread runs Python code again
        taken.append(time.monotonic())
        raise KeyboardInterrupt

    sent: list[float] = []

    def interrupt() -> None:  # to this thread: the main thread, blocked, is not woken by it
        if started.wait(30):
            time.sleep(0.2)  # the caller is waiting for a message by now
            sent.append(time.monotonic())
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            time.sleep(3)
            release.set()  # the batches go on: the run can end (taking the interrupt then, if not before)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            list(run_on_devices(devices, collect_inputs([tmp_path / "in"]),
                                RunOptions(out_dir=tmp_path / "out", batch_size=2, io="threads", workers=1)))
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
        for device in devices:
            device.close()
    assert sent and taken and taken[0] - sent[0] < 1.5, (sent, taken)  # not the 3 s the batches were held
    assert not _device_threads()


def test_a_ctrl_c_starts_no_further_batch_on_any_device(tmp_path: Path, tiny_backbone,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """run_on_devices: a device's run took the caller's Ctrl-C only once it had its next result, after its
    batch on the device was written: by then the batch queued behind it had started, and the run waited for
    that one too (a large photo on a CPU: seconds, on each device). A single device's run takes it where it
    waits (see protect._wait) and drops the batches not started; each device's run now does too."""
    import threading

    from preempt_cli import Protector
    from preempt_cli.protect import _DeviceMessages

    write_random_pngs(tmp_path / "in", n=12, name="img{i:02d}.png")
    out = tmp_path / "out"
    devices = _two_devices(tiny_backbone)
    starts: list[tuple[int, float]] = []  # (device, when its batch started)
    real_transform = Protector.transform_levels

    def slow_transform(self, *args, **kw):  # every batch, on its device's compute thread
        starts.append((next(i for i, d in enumerate(devices) if d is self), time.monotonic()))
        time.sleep(1.0)
        return real_transform(self, *args, **kw)

    monkeypatch.setattr(Protector, "transform_levels", slow_transform)
    interrupted_at: list[float] = []
    real_oldest = _DeviceMessages.oldest

    def ctrl_c_once_both_devices_compute(self):  # the caller's wait, where a Ctrl-C lands
        if not interrupted_at:
            deadline = time.monotonic() + 30
            while {i for i, _ in starts} != {0, 1} and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # each run has queued its next batch behind the one computing
            interrupted_at.append(time.monotonic())
            raise KeyboardInterrupt
        return real_oldest(self)

    monkeypatch.setattr(_DeviceMessages, "oldest", ctrl_c_once_both_devices_compute)
    results, raised = _run_on_devices_in_a_thread(devices, [tmp_path / "in"],
                                                  RunOptions(out_dir=out, batch_size=1, io="threads", workers=1))  # fmt: skip
    assert interrupted_at and len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)
    assert sorted(i for i, when in starts if when < interrupted_at[0]) == [0, 1]
    assert [i for i, when in starts if when > interrupted_at[0]] == []  # no batch started after the Ctrl-C
    on_disk = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert all(n.endswith(".protected.png") for n in on_disk)  # no temporary files
    # the batches computing when it came are written, and listed
    assert sorted(r.output.name for r in results if r.status == "done") == on_disk and len(on_disk) == 2
    assert not [r for r in results if r.status == "failed"]
    assert not _device_threads()
    assert not [t for t in threading.enumerate() if t.name.startswith(("preempt-io", "preempt-compute"))]


def test_a_device_whose_run_fails_fails_its_files_and_the_others_finish(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """run_on_devices: a device whose run raised (its process pool not starting, a device fault) ended the
    whole run with an internal error: the other devices' files written meanwhile were never listed, and
    which files were left undone was not said. That device's files now fail with the reason, and the other
    devices finish theirs."""
    from preempt_cli import Protector

    write_random_pngs(tmp_path / "in", n=12, name="img{i:02d}.png")
    out = tmp_path / "out"
    devices = _two_devices(tiny_backbone)
    real_run = Protector.run

    def a_run_that_fails_on_the_second_device(self, *args, **kw):
        if self is devices[1]:
            raise RuntimeError("the device fell off the bus")
        yield from real_run(self, *args, **kw)

    monkeypatch.setattr(Protector, "run", a_run_that_fails_on_the_second_device)
    results, raised = _run_on_devices_in_a_thread(devices, [tmp_path / "in"],
                                                  RunOptions(out_dir=out, batch_size=2, io="threads", workers=2))  # fmt: skip
    assert raised == []
    assert sorted(r.input.name for r in results) == [f"img{i:02d}.png" for i in range(12)]  # each once
    failed = [r for r in results if r.status == "failed"]
    assert sorted(r.input.name for r in failed) == [f"img{i:02d}.png" for i in range(1, 12, 2)]  # device 1's share
    assert {r.reason for r in failed} == {"the run on cpu failed: RuntimeError: the device fell off the bus"}
    on_disk = sorted(p.name for p in out.iterdir())
    assert sorted(r.output.name for r in results if r.status == "done") == on_disk
    assert on_disk == [f"img{i:02d}.protected.png" for i in range(0, 12, 2)]
    assert not _device_threads()


def test_revert_white_box_stops_every_defense_s_writes_to_a_full_disk(tmp_path: Path, registry: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """revert --white-box runs once per recorded defense: each run learnt anew that the disk was full, its
    first files computed only to fail. A file system found full stops the later defenses' files too."""
    import errno

    for day, seed in (("day1", "1"), ("day2", "2")):
        _images(tmp_path / day, n=3, seed=int(seed))
        assert run(["protect", str(tmp_path / day), *FAST, "--labels", "backbone", "--seed", seed], registry).exit_code == 0
    out = tmp_path / "out"
    marker = tmp_path / "a-write-failed"
    _fail_writes_in(monkeypatch, [out / "day1", out / "day2"], "threads", errno.ENOSPC, marker)
    computed = _computed(monkeypatch, failed_write=marker)
    result = run(["revert", str(tmp_path / "day1"), str(tmp_path / "day2"), "--white-box", "-o", str(out),
                  "--batch-size", "1", "--io", "threads", "--workers", "2", "--device", TEST_DEVICE_ARG], registry)  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    not_attempted = [line for line in errors if ": not attempted: no space left on the file system of " in line]
    assert len(errors) == 6 and len(not_attempted) == 6 - len(computed)
    assert len({p.parent for p in computed}) == 1  # the first defense's files alone: the other's none
    assert "Reverted 0, skipped 6, failed 6 in" in result.stderr  # (skipped: the originals beside them)


@pytest.mark.parametrize("why", ["sandbox", "no-forkserver"])
def test_io_auto_falls_back_to_threads_when_processes_cannot_start(tmp_path: Path, tiny_backbone, why: str,
                                                                   monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # fmt: skip
    import multiprocessing

    import preempt_cli.protect as protect_module
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    class NoProcesses:  # a sandbox that forbids new processes
        def __init__(self, *args, **kwargs) -> None:
            pass

        def submit(self, *args, **kwargs):
            raise PermissionError("operation not permitted")

        def shutdown(self, **kwargs) -> None:
            pass

    def no_forkserver(method: str | None = None):  # as on Windows
        raise ValueError(f"cannot find context for {method!r}")

    if why == "sandbox":
        monkeypatch.setattr(protect_module, "ProcessPoolExecutor", NoProcesses)
    else:
        monkeypatch.setattr(multiprocessing, "get_context", no_forkserver)
    monkeypatch.setattr(Protector, "_io_processes", lambda self, options: options.io != "threads")  # as on a GPU
    _images(tmp_path / "in", n=3)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2))
    results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io="auto")))
    assert [r.status for r in results] == ["done"] * 3
    assert "using threads" in caplog.text
    with pytest.raises(ConfigError, match="cannot start worker processes"):
        list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io="processes",
                                                                        overwrite=True)))  # fmt: skip


def test_io_auto_on_a_gpu_without_a_fork_server_takes_threads(tmp_path: Path, tiny_backbone,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Windows has no fork server: ``auto`` chose worker processes on a GPU all the same, and every run
    warned that they could not start. It takes threads there; ``--io processes`` says why it cannot."""
    import multiprocessing
    from types import SimpleNamespace

    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    on_a_gpu = SimpleNamespace(device=torch.device("cuda"))
    options = RunOptions(io="auto", workers=4)
    assert Protector._io_processes(on_a_gpu, options)  # here (Linux): worker processes
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # as on Windows
    assert not Protector._io_processes(on_a_gpu, options)
    _images(tmp_path / "in", n=2)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1))
    with pytest.raises(ConfigError, match="no fork server to start them from"):
        list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / "out", io="processes")))


def test_a_dead_io_worker_fails_only_the_files_it_held(tmp_path: Path, tiny_backbone) -> None:
    import os
    import signal
    import time

    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    _images(tmp_path / "in", n=160, size=(32, 32))  # chunks of 32 files, 8 per batch: decodes go on
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        options = RunOptions(out_dir=tmp_path / "out", io="processes", workers=2, batch_size=8)
        results = protector.run(collect_inputs([tmp_path / "in"]), options)
        seen = [next(results)]
        pool = protector._processes
        for pid in list(pool._processes):  # as the kernel's OOM killer would
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not pool._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._broken
        seen += list(results)  # the run goes on in new workers instead of stopping with BrokenProcessPool
        assert protector._processes is not pool and not protector._processes._broken
        # and a later run starts clean
        again = list(protector.run(collect_inputs([tmp_path / "in"]), options))
    assert len(seen) == 160 and len({r.input for r in seen}) == 160
    failed = [r for r in seen if r.status == "failed"]
    assert all(r.reason.startswith("worker process failed") for r in failed), {r.reason for r in failed}
    assert sum(r.status == "done" for r in seen) >= 160 - 96  # at most what was in flight when it died
    # the next run completes the job: it redoes only failed files (a write chunk can have written some of
    # its files, whole, before its worker died: those are skipped) and skips what was done
    assert all(r.status in ("done", "skipped") for r in again)
    assert failed and {r.input for r in again if r.status == "done"} <= {r.input for r in failed}


def test_images_of_many_sizes_are_computed_as_they_come_not_all_held_to_the_end(tmp_path: Path, tiny_backbone,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    sizes = [(w, h) for h in range(8, 18) for w in range(8, 18)]  # 100 sizes, one image each: no batch fills
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i:03d}.png")
    decoded, at_first_batch = [0], []
    real_decoded, real_compute = Protector._decoded, Protector._compute_with_backoff

    def counting_decoded(self, *args, **kwargs):
        decoded[0] += 1
        return real_decoded(self, *args, **kwargs)

    def noting_compute(self, batch):
        at_first_batch.append(decoded[0])
        return real_compute(self, batch)

    monkeypatch.setattr(Protector, "_decoded", counting_decoded)
    monkeypatch.setattr(Protector, "_compute_with_backoff", noting_compute)
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1, backward_steps=1))
    # batch_size 1 at the backbone's 32x32: 2 to 16 of these small images per batch, 64 decoded ahead
    options = RunOptions(out_dir=tmp_path / "out", io="threads", workers=2, batch_size=1)
    results = list(protector.run(collect_inputs([tmp_path / "in"]), options))
    assert [r.status for r in results] == ["done"] * len(sizes)
    # computing starts once 16 sizes wait (plus the files decoding ahead, and one more a worker may finish
    # while the first batch is being launched: 82 seen once on a loaded machine), long before the last is
    # decoded
    assert at_first_batch[0] <= 17 + 64 + options.workers < len(sizes)


# -- streams: redirected stdout, pipes, unwrapped tables and logs, NUL-terminated paths -----------------------
def test_version_is_answered_without_importing_torch() -> None:
    """`preempt --version` took 1.3-2.7 s, nearly all of it importing torch, before printing one line."""
    import subprocess

    code = ("import sys; sys.argv = ['preempt', '--version']; from preempt_cli.__main__ import main; main(); "
            "print('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines() == [f"preempt {__version__}", "False"], done.stderr
    # the same line as the full CLI gives (where --version comes with other arguments)
    assert CliRunner().invoke(app, ["--version"]).stdout == f"preempt {__version__}\n"


def _child_env() -> dict[str, str]:
    """The environment of a ``preempt`` child process: no setting that would change what rich sees."""
    import os

    drop = {"FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "PREEMPT_DEVICE",
            "PREEMPT_BACKBONE", "PREEMPT_CLASSIFIER", "PREEMPT_DEBUG", "PREEMPT_LOG"}  # fmt: skip
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "TERM": "xterm-256color"}


def test_results_stay_on_a_redirected_stdout_while_the_progress_bar_is_on_a_terminal(tmp_path: Path,
                                                                                     registry: Path) -> None:  # fmt: skip
    import os
    import subprocess
    import sys
    import threading

    pty = pytest.importorskip("pty")
    _images(tmp_path / "in", n=2)
    master, slave = pty.openpty()
    terminal: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            terminal.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "preempt_cli", "protect", str(tmp_path / "in"), *FAST,
                               "--labels", "backbone", "--registry", str(registry)],
                              stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=_child_env(), timeout=300)  # fmt: skip
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    shown = b"".join(terminal).decode(errors="replace")
    assert proc.returncode == 0, shown
    assert "\x1b[" in shown and "Protected 2" in shown  # stderr was a terminal: the bar was drawn there
    assert proc.stdout.decode().splitlines() == [str(tmp_path / "in" / f"img{i}.protected.png") for i in (0, 1)]
    assert ".protected.png" not in shown  # the results went to stdout, not to the terminal


def test_the_progress_bar_moves_stdout_above_it_only_when_stdout_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from preempt_cli.cli import _common

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    from rich.console import Console

    # a bar is drawn only on a terminal (elsewhere, and with -q, there is no Progress at all)
    assert isinstance(_common.progress_bar(quiet=False), _common._NoProgress)  # pytest's stderr: not one
    monkeypatch.setattr(_common, "stderr", Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(_common.progress_bar(quiet=True), _common._NoProgress)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert _common.progress_bar(quiet=False).live._redirect_stdout is False
    monkeypatch.setattr(sys, "stdout", Tty())
    assert _common.progress_bar(quiet=False).live._redirect_stdout is True


def test_a_closed_pipe_stops_quietly_with_exit_141(tmp_path: Path, registry: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # as `preempt ... | head -1` once head has exited
    try:
        proc = subprocess.run([sys.executable, "-m", "preempt_cli", "models", "list", "--json", "--registry",
                               str(registry)], stdout=write_end, stderr=subprocess.PIPE, env=_child_env(),
                              timeout=300)  # fmt: skip
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")
    # help and usage text are printed by Click before any command runs (`preempt --help | head -1`)
    for args in (["--help"], ["protect", "--help"], ["--version"], []):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run([sys.executable, "-m", "preempt_cli", *args], stdout=write_end,
                                  stderr=subprocess.PIPE, env=_child_env(), timeout=300)  # fmt: skip
        finally:
            os.close(write_end)
        assert (proc.returncode, proc.stderr.decode()) == (141, ""), args
    # a protect run stops at the first result it cannot print, with no error line
    from preempt_cli.cli import _common

    def closed(text: str, end: str = "\n") -> None:
        raise BrokenPipeError(32, "Broken pipe")

    _images(tmp_path / "in", n=2)
    monkeypatch.setattr(_common, "print_line", closed)
    result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 141 and "error" not in result.stderr


def test_a_closed_stderr_leaves_the_exit_code_to_the_run(tmp_path: Path, registry: Path) -> None:
    """``preempt protect ... 2>&1 >results | head -1``: once stderr's reader had gone, the summary line
    (rich's) pointed stdout at /dev/null and exited 141, "stdout closed by its reader", after a run that
    had done every file (with -q, no summary, the same run exited 0). The run keeps its own exit code."""
    import os
    import subprocess
    import sys

    _images(tmp_path / "in", n=2)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    for extra, code in (([], 1), (["-q"], 1)):
        read_end, write_end = os.pipe()
        os.close(read_end)  # as `2>&1 >results | head -1` once head has exited
        try:
            proc = subprocess.run([sys.executable, "-m", "preempt_cli", "protect", str(tmp_path / "in"), *FAST,
                                   "--labels", "backbone", "--json", "--overwrite", *extra, "--registry",
                                   str(registry)], stdout=subprocess.PIPE, stderr=write_end, env=_child_env(),
                                  timeout=300)  # fmt: skip
        finally:
            os.close(write_end)
        rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
        assert proc.returncode == code, (extra, proc.returncode, rows)
        assert sorted(r["status"] for r in rows) == ["done", "done", "failed"]
    (tmp_path / "in" / "broken.png").unlink()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "preempt_cli", "protect", str(tmp_path / "in"), *FAST,
                               "--labels", "backbone", "--overwrite", "--registry", str(registry)],
                              stdout=subprocess.PIPE, stderr=write_end, env=_child_env(), timeout=300)  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and len(proc.stdout.decode().splitlines()) == 2, proc


def test_tables_and_logs_to_a_pipe_are_not_wrapped(tmp_path: Path, registry: Path) -> None:
    names = [json.loads(x)["name"] for x in run(["models", "list", "--json"], registry).stdout.splitlines()]
    table = run(["models", "list"], registry, env={"COLUMNS": "60"})
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert len(lines) == 2 + len(names)  # header, rule, one line per model: nothing wrapped
    assert [line.split()[0] for line in lines[2:]] == names  # names whole
    assert all(line == line.rstrip() for line in lines)  # no padding to the table's width
    # -v logs: one plain line each, paths whole
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "in"
    (img,) = _images(deep, n=1)
    assert run(["protect", str(deep), *FAST, "--labels", "backbone"], registry).exit_code == 0
    again = run(["protect", str(deep), *FAST, "--labels", "backbone", "-v"], registry, env={"COLUMNS": "60"})
    assert f"info: skipped {img}: " in again.stderr


def test_print0_ends_output_paths_with_nul(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "in", n=2)
    result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "-0"], registry)
    assert result.exit_code == 0
    expected = [tmp_path / "in" / f"img{i}.protected.png" for i in (0, 1)]
    assert result.stdout == "".join(f"{p}\0" for p in expected)
    reverted = run(["revert", *map(str, expected), "--white-box", "--print0", "--device", TEST_DEVICE_ARG], registry)
    assert reverted.exit_code == 0
    assert reverted.stdout == "".join(f"{p.parent / p.stem}.reverted.png\0" for p in expected)
    both = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "-0", "--json"], registry)
    assert both.exit_code == 2 and "--print0" in both.stderr


# -- revert --white-box: what comes from the metadata ---------------------------------------------------------
def test_white_box_reversion_ignores_the_environments_backbone_and_refuses_given_settings(tmp_path: Path,
                                                                                          registry: Path) -> None:  # fmt: skip
    _images(tmp_path / "r", n=1)
    assert run(["protect", str(tmp_path / "r"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    target = str(tmp_path / "r" / "img0.protected.png")
    env = {"PREEMPT_BACKBONE": "no-such-model", "PREEMPT_CLASSIFIER": "no-such-model", "PREEMPT_DEVICE": "all"}
    ok = run(["revert", target, "--white-box"], registry, env=env)  # protect's settings do not get in the way
    assert ok.exit_code == 0, ok.stderr
    for args, option in ((["--backbone", "tiny-key"], "--backbone"), (["-n", "2"], "--samples"),
                         (["--eps", "4/255"], "--eps"), (["-c", "tiny-key"], "--classifier"),
                         (["--preset", "paper"], "--preset"), (["--labels", "backbone"], "--labels")):  # fmt: skip
        refused = run(["revert", target, "--white-box", "--overwrite", *args, "--device", TEST_DEVICE_ARG], registry)
        assert refused.exit_code == 2, args
        assert f"--white-box takes {option} from each file's metadata" in refused.stderr


def test_white_box_reversion_uses_the_recorded_seed_unless_one_is_given(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "s", n=1)
    assert run(["protect", str(tmp_path / "s"), *FAST, "--labels", "backbone", "--seed", "5"], registry).exit_code == 0
    protected = tmp_path / "s" / "img0.protected.png"
    reverted = tmp_path / "s" / "img0.protected.reverted.png"
    assert run(["revert", str(protected), "--white-box", "--device", TEST_DEVICE_ARG], registry).exit_code == 0
    assert json.loads(Image.open(reverted).text["preempt"])["seed"] == 5
    assert run(["revert", str(protected), "--white-box", "--seed", "0", "--overwrite", "--device", TEST_DEVICE_ARG],
               registry).exit_code == 0  # fmt: skip
    assert json.loads(Image.open(reverted).text["preempt"])["seed"] == 0


# -- outputs: own suffix, unusable --out-dir --------------------------------------------------------------------
def test_a_folder_walk_leaves_out_outputs_of_the_chosen_suffix(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "sfx", n=1)
    args = ["protect", str(tmp_path / "sfx"), *FAST, "--labels", "backbone", "--suffix", "_safe"]
    assert run(args, registry).exit_code == 0
    again = run([*args, "--overwrite", "--json"], registry)
    assert [Path(json.loads(x)["input"]).name for x in again.stdout.splitlines()] == ["img0.png"]
    assert sorted(p.name for p in (tmp_path / "sfx").iterdir()) == ["img0.png", "img0_safe.png"]
    # an original that merely ends like the suffix is still an input (only preempt's own files are left out)
    (tmp_path / "sfx" / "banner_safe.png").write_bytes((tmp_path / "sfx" / "img0.png").read_bytes())
    third = run([*args, "--json"], registry)
    statuses = {Path(json.loads(x)["input"]).name: json.loads(x)["status"] for x in third.stdout.splitlines()}
    assert statuses == {"img0.png": "skipped", "banner_safe.png": "done"}


@pytest.mark.parametrize("command", [["protect", "-b", "no-such-model", "--suffix", ".reverted"],
                                     ["revert", "--white-box", "--suffix", ".protected"],
                                     ["protect", "-b", "no-such-model", "--suffix", "x" * 251]])  # fmt: skip
def test_a_suffix_no_output_could_take_is_refused_before_any_work(tmp_path: Path, registry: Path, command) -> None:
    # the other command's marker (revert did nothing, exit 0: its inputs looked like its outputs), or longer
    # than any name (every file failed alone); an unknown model would be the error if models loaded first
    _images(tmp_path, n=1)
    result = run([command[0], str(tmp_path), *command[1:]], registry)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--suffix" in result.stderr and "no-such-model" not in result.stderr


@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_an_unusable_out_dir_is_refused_before_any_work(tmp_path: Path, registry: Path, where: str) -> None:
    _images(tmp_path / "in", n=1)
    (tmp_path / "afile").write_text("")
    for command in (["protect", "--labels", "backbone"], ["revert", "--white-box"]):
        # an unknown model would be the error if the models were loaded first
        result = run([command[0], str(tmp_path / "in"), *command[1:], "-b" if command[0] == "protect" else "--seed",
                      "no-such-model" if command[0] == "protect" else "0", "-o", str(tmp_path / where)], registry)  # fmt: skip
        assert result.exit_code == 2
        assert f"--out-dir {tmp_path / where}: not a folder" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_or_dangling_out_dir_is_refused_before_any_work(tmp_path: Path, registry: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _images(tmp_path / "in", n=1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, said in (("", "empty"), ("dangling", "symbolic link")):
        result = run(["protect", str(tmp_path / "in"), "--labels", "backbone", "-b", "no-such-model", "-o", out],
                     registry)  # fmt: skip
        assert result.exit_code == 2 and said in result.output, result.output
    assert not list(tmp_path.glob("*.png"))  # nothing written into the current folder


def test_error_lines_stay_one_line_whatever_the_file_name(tmp_path: Path, registry: Path) -> None:
    bad = tmp_path / "in" / "new\nline\x1b[31m.png"
    bad.parent.mkdir()
    bad.write_text("not an image")
    result = run(["protect", str(bad), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "new\\nline\\x1b[31m.png" in errors[0]
    assert "\x1b" not in result.stderr



def test_log_lines_stay_one_line_whatever_the_file_name(tmp_path: Path, registry: Path) -> None:
    # the -v lines naming a file (skipped, a link not followed) wrote its name as it is: an escape code in
    # it reached the terminal (a window title set, colours), a newline split the line
    folder = tmp_path / "in"
    write_random_pngs(folder, 1, name="a\x1b]0;title\x07\nb.png")
    (folder / "link\x1b[31m").symlink_to(tmp_path)  # a link to a folder, not followed
    args = ["protect", str(folder), *FAST, "--labels", "backbone", "-v"]
    assert run(args, registry).exit_code == 0
    result = run(args, registry)  # the file skipped: its output exists
    assert result.exit_code == 0 and "skipped" in result.stderr and "link\\x1b[31m" in result.stderr, result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "a\\x1b]0;title\\x07\\nb.png" in result.stderr


def test_results_on_a_terminal_show_names_escaped(tmp_path: Path, registry: Path, monkeypatch) -> None:
    # the output paths on stdout, written as they are (for a pipe), sent an escape code of a crafted file
    # name to the terminal showing them: quoted there as ls quotes them, as they are for a pipe
    from preempt_cli.cli import _common

    folder = tmp_path / "in"
    write_random_pngs(folder, 1, name="a\x1b]0;title\x07.png")
    args = ["protect", str(folder), *FAST, "--labels", "backbone", "-q"]
    monkeypatch.setattr(_common, "stdout_is_terminal", lambda: True)
    result = run([*args, "-o", str(tmp_path / "out")], registry)
    assert result.exit_code == 0 and "\x1b" not in result.stdout and "\x07" not in result.stdout, result.stdout
    assert result.stdout == f"$'{tmp_path}/out/a\\E]0;title\\a.protected.png'\n"
    monkeypatch.setattr(_common, "stdout_is_terminal", lambda: False)
    result = run([*args, "-o", str(tmp_path / "piped")], registry)
    assert result.stdout == f"{tmp_path}/piped/a\x1b]0;title\x07.protected.png\n"


def test_revert_help_describes_revert(registry: Path) -> None:
    text = " ".join(run(["revert", "--help"], registry).output.replace("│", " ").split())
    assert "reversion" in text and "folder walks always leave out *.reverted.png" in text
    assert "shapes the perturbation" not in text  # protect's description of its key


def test_eval_help_describes_its_backbone_and_classifier(registry: Path) -> None:
    text = " ".join(run(["eval", "--help"], registry, env={"COLUMNS": "400"}).output.replace("│", " ").split())
    assert "Backbone of the fp and bilevel defenses that name none" in text
    assert "default: the built-in preempt-resnet20-at" in text and "preempt-resnet20-std when the backbone" in text
    assert "for protect" not in text and "shapes the perturbation" not in text


# -- models: convert, list --------------------------------------------------------------------------------------
def test_models_convert_never_overwrites_its_input_and_replaces_an_output_only_with_force(tmp_path: Path) -> None:
    net = create_arch("cifar_resnet20", num_classes=10)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    before = ckpt.read_bytes()
    for args in ([str(ckpt), str(ckpt)], [str(ckpt), str(ckpt), "--force"], [str(ckpt), f"{tmp_path}/./ckpt.pt"]):
        result = CliRunner().invoke(app, ["models", "convert", *args])
        assert result.exit_code == 2 and "is the checkpoint itself" in result.stderr
    assert ckpt.read_bytes() == before
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(app, ["models", "convert", str(ckpt), str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr and out.read_bytes() == b"keep me"
    assert CliRunner().invoke(app, ["models", "convert", str(ckpt), str(out), "--force"]).exit_code == 0
    assert out.read_bytes() != b"keep me"


class _SubclassedTensor(torch.Tensor):
    """A tensor subclass: torch refuses it, and no inert stand-in can take its place."""


def test_models_convert_refuses_a_pickle_in_one_plain_line(tmp_path: Path) -> None:
    odd = torch.zeros(2).as_subclass(_SubclassedTensor)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "odd": odd}, tmp_path / "evil.pt")
    result = CliRunner().invoke(app, ["models", "convert", str(tmp_path / "evil.pt"), str(tmp_path / "e.safetensors")])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "\x1b" not in line and line.startswith(f"error: {tmp_path / 'evil.pt'}: ")
    assert "weights_only" in line and "only if you trust the file" in line


def test_models_convert_help_gives_the_default_prefix_once() -> None:
    text = " ".join(CliRunner().invoke(app, ["models", "convert", "--help"], env={"COLUMNS": "400"}).stdout.split())
    assert "[default: module.]" in text and "(default: module.)" not in text


def test_models_list_verbose_and_roles(registry: Path) -> None:
    verbose = run(["models", "list", "--verbose"], registry)
    assert verbose.exit_code == 0
    header = verbose.stdout.splitlines()[0].split()
    assert {"sha256", "mean", "std", "revision", "registry"} <= set(header)
    key_row = next(line for line in verbose.stdout.splitlines() if line.split()[0] == "tiny-key")
    sha = json.loads(run(["models", "show", "tiny-key", "--json"], registry).stdout)["sha256"]
    assert sha[:12] in key_row
    bogus = run(["models", "list", "--role", "bogus"], registry)
    assert bogus.exit_code == 2 and "backbone, classifier, victim" in bogus.stderr and not bogus.stdout


def test_models_commands_take_quiet(registry: Path, tmp_path: Path) -> None:
    """-q as in the other commands: results on stdout, nothing else on stderr but errors."""
    # a row pinning a sha256 on a moving Hub revision: a warning, on stderr, unless -q
    warns = tmp_path / "warns.toml"
    warns.write_text(registry.read_text() + f'\n[models.moving]\nbase = "tiny-key"\nsource = "hf://org/repo/w.safetensors"'
                     f'\nsha256 = "{"1" * 64}"\n')  # fmt: skip
    loud = run(["models", "list"], warns)
    assert loud.exit_code == 0 and "registries:" in loud.stderr and "pin a commit" in loud.stderr
    quiet = run(["models", "list", "-q"], warns)
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == loud.stdout
    # verify -q: nothing for a model that passes, the error line for one that fails, the exit code for both
    ok = run(["models", "verify", "tiny-key", "-q"], registry)
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, "", "")
    failed = run(["models", "verify", "tiny-key", "tiny-labeller", "-q"], registry)
    assert failed.exit_code == 1 and failed.stdout == ""
    (line,) = failed.stderr.splitlines()
    assert line.startswith("error: tiny-labeller: ")
    # convert -q: the output's path alone, for a script to take
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpt.pt")
    out = tmp_path / "w.safetensors"
    converted = CliRunner().invoke(app, ["models", "convert", str(tmp_path / "ckpt.pt"), str(out), "-q"])
    assert converted.exit_code == 0 and converted.stdout == f"{out}\n" and out.is_file()


def test_precision_help_gives_measured_figures() -> None:
    result = CliRunner().invoke(app, ["protect", "--help"], env={"COLUMNS": "400"})
    assert "1.8x" not in result.stdout and "H100" in result.stdout


# -- eval: usage errors found before the work -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "pgd:steps=abc"], "--attack pgd:steps=abc: steps must be a whole number, got 'abc'"),
        (["--attack", "fgsm"], "use pgd or aa"),
        (["--csv", "{tmp}/afile/x.csv"], "--csv"),
    ],
)
def test_eval_usage_errors_exit_2(tmp_path: Path, registry: Path, args: list[str], message: str) -> None:
    (tmp_path / "afile").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run(["eval", str(tmp_path), "--victim", "no-such-model", "--out", str(tmp_path / "o"), *args], registry)
    assert result.exit_code == 2 and message in result.stderr and "internal error" not in result.stderr
    missing = run(["eval", str(tmp_path / "nope"), "--victim", "tiny-key"], registry)
    assert missing.exit_code == 2 and f"{tmp_path / 'nope'}: no such folder" in missing.stderr


def test_eval_loads_before_any_work_only_the_models_the_run_uses(tmp_path: Path, registry: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a reversion with flipped labels uses no classifier: the default one (here unloadable) was loaded
    # up front and ended the run; a black-box reverter's backbone is checked up front too
    _images(tmp_path / "data" / "cat", n=2)
    monkeypatch.setenv("PREEMPT_CLASSIFIER", "no-such-classifier")
    args = ["eval", str(tmp_path / "data"), "--victim", "tiny-key", "-b", "tiny-key", "--defense", "fp:samples=1",
            "--reversion", "--flip-fraction", "1", "--out", str(tmp_path / "o"), "--device", TEST_DEVICE_ARG, "-q"]  # fmt: skip
    result = run([*args, "--reversion-backbone", "tiny-labeller-unpinned"], registry)
    assert result.exit_code == 0, result.stderr
    missing = run([*args[:-5], "--out", str(tmp_path / "o2"), *args[-3:], "--reversion-backbone", "no-such-backbone"],
                  registry)  # fmt: skip
    assert missing.exit_code == 2 and "no-such-backbone" in missing.stderr
    assert not (tmp_path / "o2").exists()  # refused before the defense ran (or its folder was made)


@pytest.mark.parametrize("csv_name", ["afile/r.csv", "afile/sub/r.csv"])
def test_eval_csv_under_a_file_names_the_file_in_its_way(tmp_path: Path, csv_name: str) -> None:
    """``--csv`` in a folder that a file stands in the way of said "cannot create its folder (Not a
    directory)", naming neither the folder nor the file, where the file was deeper than its parent."""
    from preempt_cli.cli._eval import _check_outputs

    (tmp_path / "data").mkdir()
    (tmp_path / "afile").write_text("a file, not a folder")
    csv_path = tmp_path / csv_name
    with pytest.raises(ConfigError) as raised:
        _check_outputs(tmp_path / "data", tmp_path / "out", csv_path)
    assert str(raised.value) == (f"--csv {csv_path}: cannot create folder {csv_path.parent}: {tmp_path / 'afile'} "
                                 "is a file, not a folder")  # fmt: skip


def test_eval_csv_folder_is_created_and_victim_names_are_whole(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "data" / "cat", n=2)
    victim = "tiny-victim-with-a-name-long-enough-to-be-cut-in-eighty-columns"
    (tmp_path / "long.toml").write_text(f'[models.{victim}]\narch = "cifar_resnet20"\narch_args = {{ shortcut = '
                                        f'"pad_end" }}\nclasses = "cifar10"\nsource = "file:{registry.parent}/'
                                        'labeller.safetensors"\n')  # fmt: skip
    csv_path = tmp_path / "new" / "sub" / "rows.csv"
    result = run(["eval", str(tmp_path / "data"), "--victim", victim, "-b", "tiny-key", "--defense", "none",
                  "--attack", "pgd:steps=1", "--csv", str(csv_path), "--out", str(tmp_path / "o"),
                  "--device", TEST_DEVICE_ARG, "--registry", str(tmp_path / "long.toml")], registry)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert csv_path.read_text().startswith("victim,")
    (row,) = [line for line in result.stdout.splitlines() if "PGD" in line]
    assert row.split()[0] == victim


def test_eval_results_that_cannot_be_written_fail_after_they_are_shown(tmp_path: Path, registry: Path) -> None:
    # results.json was written with a bare write_text before the table: a file in the way (or a full disk)
    # was an internal error, with nothing shown, after all the work
    _images(tmp_path / "data" / "cat", n=2)
    (tmp_path / "o" / "results.json").mkdir(parents=True)
    result = run(["eval", str(tmp_path / "data"), "--victim", "tiny-key", "--defense", "none", "--attack",
                  "pgd:steps=1", "--out", str(tmp_path / "o"), "--device", TEST_DEVICE_ARG], registry)  # fmt: skip
    assert result.exit_code == 1 and "internal error" not in result.stderr
    assert f"{tmp_path / 'o' / 'results.json'}: cannot write: Is a directory" in result.stderr
    assert "PGD" in result.stdout  # the table
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


def test_results_that_cannot_reach_stdout_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``>&-`` (stdout closed) and ``> /dev/full`` were internal errors (AttributeError, OSError)."""
    import errno
    import io

    from preempt_cli.cli import _common as c

    class Full(io.StringIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sys.stdout", None)
    with pytest.raises(ConfigError, match="stdout is closed"):
        c.print_line("out.png")
    monkeypatch.setattr("sys.stdout", Full())
    with pytest.raises(c.StdoutWriteError, match="cannot write the results to stdout: No space left on device"):
        c.print_line("out.png")
    monkeypatch.setattr("sys.stdout", io.StringIO())
    c.print_line("out.png")  # and a working stdout gets the line


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("command", [["protect", "--json"], ["models", "show", "tiny-key"]])
def test_results_sent_to_a_full_device_fail_the_run_with_exit_1(tmp_path: Path, registry: Path,
                                                                 command: list[str]) -> None:
    """``> /dev/full`` exited 2, the code of a usage or setup error, though the command line was right (and
    ``models show`` said it as an internal error): a full disk fails the run, exit 1, naming stdout and why."""
    if command[0] == "protect":
        _images(tmp_path / "in", n=1)
        command = [*command, str(tmp_path / "in"), *FAST, "--labels", "backbone"]
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "preempt_cli", *command, "--registry", str(registry)],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=_child_env(),
                              timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == "error: cannot write the results to stdout: No space left on device"


def test_protect_input_handling_of_a_black_box_test(tmp_path: Path, registry: Path) -> None:
    """An original among the inputs is never replaced by another input's output (``--overwrite`` did);
    an empty list on stdin is nothing to do, not a usage error; shards of ``src`` and ``src/*`` into one
    --out-dir cover every file once (18 of 24 did)."""
    folder = tmp_path / "e"
    _images(folder, n=1, name="a.png")
    _images(folder, n=1, name="a.protected.png", seed=1)  # a user's original, no preempt metadata
    before = _digest([folder / "a.protected.png"])
    for extra in ([], ["--overwrite"]):
        r = run(["protect", str(folder / "a.png"), str(folder / "a.protected.png"), *FAST, "--labels", "backbone",
                 "--json", *extra], registry)  # fmt: skip
        rows = {Path(row["input"]).name: row for row in map(json.loads, r.stdout.splitlines())}
        assert r.exit_code == 1 and rows["a.png"]["status"] == "failed", r.output
        assert f"would replace input {folder / 'a.protected.png'}" in rows["a.png"]["reason"]
        assert _digest([folder / "a.protected.png"]) == before
    r = run(["protect", "-", *FAST, "--labels", "backbone"], registry, input="")
    assert r.exit_code == 0 and "No image paths on stdin: nothing to protect." in r.stderr, r.output
    # an empty list saved by Notepad: its byte order mark alone (failed as a file named U+FEFF, exit 1)
    bom = run(["protect", "-", *FAST, "--labels", "backbone"], registry, input="\ufeff\r\n")
    assert bom.exit_code == 0 and "No image paths on stdin: nothing to protect." in bom.stderr, bom.output
    (tmp_path / "empty").mkdir()
    named = run(["protect", str(tmp_path / "empty"), *FAST, "--labels", "backbone"], registry)
    assert named.exit_code == 2 and f"error: no images found in {tmp_path / 'empty'}\n" in named.stderr
    # a folder listed on stdin is named as much as one on the command line: without images, a usage error
    listed = run(["protect", "-", *FAST, "--labels", "backbone"], registry, input=f"{tmp_path / 'empty'}\n")
    assert listed.exit_code == 2 and f"no images found in {tmp_path / 'empty'}\n" in listed.stderr, listed.output
    # many paths: the first few named, the others counted
    many = run(["protect", *[str(tmp_path / "empty")] * 5, *FAST, "--labels", "backbone"], registry)
    assert many.exit_code == 2 and many.stderr.rstrip().endswith(" and 2 more"), many.output
    for name in ("airplane", "bird"):
        _images(tmp_path / "src" / name, n=4, seed=len(name))
    out = tmp_path / "D"
    first = run(["protect", str(tmp_path / "src"), *FAST, "--labels", "backbone", "-o", str(out), "--shard", "1/2"],
                registry)  # fmt: skip
    children = [str(p) for p in sorted((tmp_path / "src").iterdir())]
    second = run(["protect", *children, *FAST, "--labels", "backbone", "-o", str(out), "--shard", "2/2"], registry)
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert len(first.stdout.splitlines()) + len(second.stdout.splitlines()) == 8
    assert len(list(out.rglob("*.protected.png"))) == 8


def test_a_file_of_several_frames_is_protected_with_a_warning(tmp_path: Path, registry: Path) -> None:
    """Its first frame is protected, and stderr (and --json) say that the other frames are not in the
    output: a multi-page scan lost its pages 2 and later without a word."""
    from PIL import Image

    frames = [Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)) for i in range(1, 3)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    result = run(["protect", str(tmp_path / "scan.tif"), *FAST, "--labels", "backbone", "--json"], registry)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    note = "has 2 frames (an animation or a multi-page file): only the first is protected"
    assert row["status"] == "done" and row["warnings"] == [note]
    assert f"warning: {tmp_path / 'scan.tif'}: {note}" in result.stderr.splitlines()
    with Image.open(tmp_path / "scan.protected.png") as out:
        assert getattr(out, "n_frames", 1) == 1 and out.size == (16, 16)

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_stderr_does_not_turn_the_exit_code_into_a_failure(tmp_path: Path, registry: Path) -> None:
    """A cron job's stderr on a full disk: every file was written, then the summary failed to print and
    the run exited 1 ("some inputs failed", which none had) with an internal error. The exit code now says
    how the inputs went (0; 1 with a missing input), and the outputs are all there."""
    import subprocess
    import sys

    _images(tmp_path / "in", n=2)
    command = [sys.executable, "-m", "preempt_cli", "protect", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
               *FAST, "--labels", "backbone", "--registry", str(registry)]  # fmt: skip
    with open("/dev/full", "w") as full:
        ok = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=full, env=_child_env(), timeout=120)
        missing = subprocess.run([*command, str(tmp_path / "gone.png")], stdout=subprocess.DEVNULL, stderr=full,
                                 env=_child_env(), timeout=120)  # fmt: skip
    assert ok.returncode == 0 and missing.returncode == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.protected.png", "img1.protected.png"]

def _start_a_long_run(tmp_path: Path, registry: Path, n: int = 600, *,
                      own_group: bool = False) -> tuple[subprocess.Popen, dict[Path, str]]:  # fmt: skip
    """``preempt protect --io processes --workers 2 --json`` on ``n`` small images, once it has written
    its first output (a run mid-way), with the digests of its originals (``own_group``: the run leads a
    process group of its own, as under ``timeout`` or a batch scheduler). Batches of 8: with the default
    batch (256) an H100 finished all 600 images between the first output and the signal, so the run was
    no longer mid-way; 75 batches are not done in the moment a signal takes."""
    import subprocess
    import sys

    originals = _images(tmp_path / "in", n=n, size=(16, 16))
    proc = subprocess.Popen([sys.executable, "-m", "preempt_cli", "protect", str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), *FAST, "--labels", "backbone", "--io", "processes", "--workers",
                             "2", "--batch-size", "8", "--json", "--registry", str(registry)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(),
                            start_new_session=own_group, bufsize=0)  # fmt: skip
    # unbuffered: a buffered readline keeps the lines after the first in its buffer, which communicate()
    # (reading the pipe itself) then never sees: files on disk looked unlisted
    first = proc.stdout.readline()
    assert first, proc.communicate(timeout=60)[1].decode()
    proc.first_line = first  # type: ignore[attr-defined]
    return proc, _digest(originals)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path: Path, registry: Path, to: str) -> None:
    """SIGTERM (timeout, Slurm, Kubernetes) killed the run mid-write: partial temporary files, no
    results for the files written, and I/O worker processes left running, holding stderr open. Sent to
    the whole process group (``timeout``, ``scancel``), it also killed the workers writing files, which
    then failed ("worker process failed")."""
    import signal

    proc, originals = _start_a_long_run(tmp_path, registry, own_group=to == "group")
    if to == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=60)  # ends: no process of the run holds the pipes
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "interrupted by SIGTERM" in err.decode()
    assert err.decode().count("preempt (SIGTERM): stopping: finishing the files being computed") == 1
    rows = [json.loads(line) for line in (proc.first_line + rest).decode().splitlines()]
    on_disk = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert on_disk and not [n for n in on_disk if n.endswith(".tmp")]
    assert sorted(Path(r["output"]).name for r in rows if r["status"] == "done") == on_disk
    assert not [r for r in rows if r["status"] == "failed"]
    assert len(on_disk) < len(originals)  # stopped mid-way
    assert _digest(list(originals)) == originals


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="POSIX signals")
def test_no_process_of_a_killed_run_survives_it(tmp_path: Path, registry: Path) -> None:
    """kill -9 of the main process left its I/O workers (and the forkserver, the resource tracker)
    running for minutes, holding stderr open: ``preempt ... 2>&1 | cat`` never ended."""
    import signal
    import subprocess

    proc, _ = _start_a_long_run(tmp_path, registry)
    proc.send_signal(signal.SIGKILL)
    try:
        proc.communicate(timeout=20)  # both pipes reach their end once every process holding them is gone
    except subprocess.TimeoutExpired:
        pytest.fail("processes of the killed run still hold its stdout or stderr after 20 s")


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_an_output_another_run_writes_meanwhile_is_not_replaced(tmp_path: Path, tiny_backbone,
                                                                 monkeypatch: pytest.MonkeyPatch, io: str) -> None:  # fmt: skip
    """Two runs with other settings on the same outputs both reported every file done, and the files held
    one run's settings: a run replaces only the outputs it found (--overwrite, or an empty leftover)."""
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    _images(tmp_path / "in", n=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img2.protected.png").write_bytes(b"")  # an empty leftover: redone, replaced
    real_decoded = Protector._decoded

    def another_run_writes(self, item, output, options, picture):  # between this run's choice and its write
        if item.path.name == "img0.png":
            output.write_bytes(b"the other run's output")
        return real_decoded(self, item, output, options, picture)

    monkeypatch.setattr(Protector, "_decoded", another_run_writes)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        results = {r.input.name: r for r in protector.run(collect_inputs([tmp_path / "in"]),
                                                          RunOptions(out_dir=out, io=io, workers=2))}  # fmt: skip
    assert results["img0.png"].status == "failed" and results["img0.png"].output is None
    assert results["img0.png"].reason == (f"output {out / 'img0.protected.png'}: appeared while this run was "
                                          "writing it (another run?); left as is")  # fmt: skip
    assert (out / "img0.protected.png").read_bytes() == b"the other run's output"
    assert results["img1.png"].status == results["img2.png"].status == "done"
    assert Image.open(out / "img2.protected.png").size == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.protected.png" for i in range(3)]


@pytest.mark.parametrize("io", ["threads", "processes"])
def test_an_output_another_run_makes_meanwhile_with_these_settings_is_skipped(
        tmp_path: Path, tiny_backbone, monkeypatch: pytest.MonkeyPatch, io: str) -> None:  # fmt: skip
    """Two job-array tasks given the same shard (a requeued task whose first run still goes): each file
    the other run wrote first failed, "appeared while this run was writing it", and the run exited 1,
    though that file is what a re-run skips (this input, these settings). It is now skipped as a re-run
    skips it; an output made otherwise still fails (the test above)."""
    from preempt_cli import ForeBackConfig, Protector, collect_inputs

    _images(tmp_path / "in", n=3)
    first, out = tmp_path / "first", tmp_path / "out"
    options = {"io": io, "workers": 2}
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=first, **options)))
    made_first = (first / "img0.protected.png").read_bytes()
    real_decoded = Protector._decoded

    def another_run_writes(self, item, output, options, picture):  # between this run's choice and its write
        if item.path.name == "img0.png":
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(made_first)
        return real_decoded(self, item, output, options, picture)

    monkeypatch.setattr(Protector, "_decoded", another_run_writes)
    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=1)) as protector:
        results = {r.input.name: r for r in protector.run(collect_inputs([tmp_path / "in"]),
                                                          RunOptions(out_dir=out, **options))}  # fmt: skip
    made = out / "img0.protected.png"
    assert results["img0.png"].status == "skipped", results["img0.png"].reason
    assert results["img0.png"].output == made
    assert results["img0.png"].reason == f"output exists: {made} (made meanwhile by another run with these settings)"
    assert made.read_bytes() == made_first
    assert results["img1.png"].status == results["img2.png"].status == "done"
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.protected.png" for i in range(3)]


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="POSIX signals")
def test_a_signal_the_command_was_started_ignoring_stays_ignored(tmp_path: Path) -> None:
    """``nohup preempt protect ... &``: SIGHUP ignored from the start must not become a stop (it did once
    SIGHUP stopped a run as Ctrl-C does)."""
    import signal
    import sys

    script = tmp_path / "nohup.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "from preempt_cli.cli._common import handle_errors\n"
        "with handle_errors():\n"
        f"    pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
        "    time.sleep(2)\n"
        "print('survived')\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_child_env(), preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.decode().strip() == "survived", err.decode()


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM"), reason="POSIX signals")
def test_a_stop_while_a_result_is_listed_waits_until_it_is_listed(capsys) -> None:
    """A stop raised in the middle of listing a result cut a JSON line in two (half written, the rest
    left in stdout's buffer) or lost the line of a file on disk: it now takes effect once the line is out."""
    import signal

    import typer

    from preempt_cli.cli import _common as c

    listed = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(typer.Exit) as stopped:
            with c.handle_errors():
                with c.listing():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # the handler has run by now: it must not have raised here
                    listed.append("the line")
                listed.append("after the listing")  # not reached: the stop takes effect as the listing ends
    finally:  # a stopped command keeps its handlers until the process exits: not this test process
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert listed == ["the line"] and stopped.value.exit_code == 128 + signal.SIGTERM


def test_globs_fail_as_the_readme_says(tmp_path: Path, registry: Path) -> None:
    """A glob matching nothing fails as an input (exit 1), as does a non-image it matches; a glob of only
    folders without images is a usage error naming it (exit 2)."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "d1").mkdir()
    for pattern, reason in (("nothing*.png", "no file matches this pattern"), ("*.txt", "not an image")):
        result = run(["protect", str(tmp_path / pattern), *FAST, "--labels", "backbone"], registry)
        assert result.exit_code == 1 and reason in result.stderr, result.output
    folders = run(["protect", str(tmp_path / "d*"), *FAST, "--labels", "backbone"], registry)
    assert folders.exit_code == 2 and f"no images found in {tmp_path / 'd*'}" in folders.stderr, folders.output


def test_protect_with_cuda_graphs_writes_what_it_writes_without(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "in", n=6)
    outputs = {}
    for flag in ("--no-cuda-graphs", "--cuda-graphs"):
        result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "--batch-size", "2", flag,
                      "-o", str(tmp_path / flag)], registry)  # fmt: skip
        assert result.exit_code == 0, result.output
        # off a GPU the flag does nothing, and says so
        assert ("needs a GPU" in result.stderr) == (flag == "--cuda-graphs" and TEST_DEVICE.type != "cuda")
        outputs[flag] = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / flag).glob("*.png")}
    assert len(outputs["--cuda-graphs"]) == 6 and outputs["--cuda-graphs"].keys() == outputs["--no-cuda-graphs"].keys()
    assert all(np.array_equal(a, outputs["--no-cuda-graphs"][name]) for name, a in outputs["--cuda-graphs"].items())
    refused = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "--cuda-graphs", "--compile",
                   "default", "-o", str(tmp_path / "never")], registry)  # fmt: skip
    assert refused.exit_code != 0 and "reduce-overhead" in refused.stderr and not (tmp_path / "never").exists()


def test_a_missing_path_listed_on_stdin_is_no_such_file_even_with_glob_characters(tmp_path: Path,
                                                                                   registry: Path) -> None:  # fmt: skip
    # the same missing name given as an argument is a pattern that matched nothing; listed, it is a path
    _images(tmp_path / "in", n=1)
    missing = tmp_path / "in" / "q?.png"
    listed = run(["protect", "-", *FAST, "--labels", "backbone", "--json"], registry,
                 input=f"{missing}\n{tmp_path / 'in' / 'img0.png'}\n")  # fmt: skip
    rows = {Path(r["input"]).name: r for r in map(json.loads, listed.stdout.splitlines())}
    assert listed.exit_code == 1 and rows["q?.png"]["reason"] == "no such file" and rows["img0.png"]["status"] == "done"
    argument = run(["protect", str(missing), *FAST, "--labels", "backbone", "--json"], registry)
    assert argument.exit_code == 1 and json.loads(argument.stdout)["reason"] == "no file matches this pattern"


def test_revert_white_box_says_a_pattern_matched_nothing(tmp_path: Path, registry: Path) -> None:
    result = run(["revert", str(tmp_path / "gone*.png"), "--white-box", "--json"], registry)
    assert result.exit_code == 1 and json.loads(result.stdout)["reason"].startswith("no file matches this pattern"), result.output


def test_a_name_too_long_to_look_up_fails_alone_however_it_is_given(tmp_path: Path, registry: Path) -> None:
    """A name over the file system's 255 bytes cannot even be looked at (ENAMETOOLONG): it is one input that
    fails with its reason, named on the command line or on stdin, and the batch goes on."""
    (good,) = _images(tmp_path / "in", n=1)
    too_long = str(tmp_path / ("a" * 300 + ".png"))
    for args, listing in (([too_long, str(good)], None), (["-"], f"{too_long}\n{good}\n")):
        out = tmp_path / f"out{len(args)}"
        result = run(["protect", *args, *FAST, "--labels", "backbone", "-o", str(out), "--json"], registry,
                     input=listing)  # fmt: skip
        assert result.exit_code == 1, result.output
        rows = {r["input"]: r for r in map(json.loads, result.stdout.splitlines())}
        assert rows[str(good)]["status"] == "done" and (out / "img0.protected.png").is_file()
        assert rows[too_long]["status"] == "failed" and "too long" in rows[too_long]["reason"]
        assert "internal error" not in result.stderr


def test_an_out_dir_whose_folder_name_is_too_long_is_refused_before_any_work(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "in", n=1)
    out = tmp_path / ("b" * 300) / "sub"
    result = run(["protect", str(tmp_path / "in"), "--labels", "backbone", "-b", "no-such-model", "-o", str(out)],
                 registry)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "a folder name of 300 bytes, more than the 255" in result.stderr


def test_an_image_piped_in_place_of_a_list_of_paths_is_a_usage_error(tmp_path: Path, registry: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    (good,) = _images(tmp_path, n=1)
    result = run(["protect", "-", *FAST, "--labels", "backbone"], registry, input=good.read_bytes())
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: stdin holds PNG image data, not a list of paths")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.protected.png"))
    good.rename(tmp_path / "GIF89a.png")  # a list whose first file is named as a GIF starts is a list
    monkeypatch.chdir(tmp_path)
    result = run(["protect", "-", *FAST, "--labels", "backbone"], registry, input="GIF89a.png\n")
    assert result.exit_code == 0 and (tmp_path / "GIF89a.protected.png").is_file(), result.output


@pytest.mark.skipif(os.name != "posix" or sys.platform == "darwin", reason="names of bytes that are not UTF-8")
def test_a_name_that_is_not_utf8_is_read_from_stdin_byte_for_byte(tmp_path: Path, registry: Path) -> None:
    """stdin is read as bytes and decoded as the file system decodes names, whatever the locale's codec."""
    (good,) = _images(tmp_path, n=1)
    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    good.rename(odd)
    result = run(["protect", "-", *FAST, "--labels", "backbone"], registry, input=os.fsencode(str(odd)) + b"\n")
    assert result.exit_code == 0, result.output
    output = tmp_path / os.fsdecode(b"caf\xe9.protected.png")
    assert output.is_file()
    assert result.stdout_bytes == os.fsencode(str(output)) + b"\n"  # its own bytes, for the next command


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux's /proc")
@pytest.mark.parametrize(("where", "kernel"), [("/proc/x", "/proc"), ("/dev/fd/x", "/proc"), ("/dev/x", "/dev")])
def test_an_out_dir_in_a_kernel_folder_is_refused_before_any_work(tmp_path: Path, registry: Path, where: str,
                                                                   kernel: str) -> None:  # fmt: skip
    _images(tmp_path / "in", n=1)
    result = run(["protect", str(tmp_path / "in"), "--labels", "backbone", "-b", "no-such-model", "-o", where], registry)
    assert result.exit_code == 2, result.output
    assert f"--out-dir {where}: it leads into {kernel}, the kernel's, which holds no files" in result.stderr


def _with_preempt_text(source: Path, target: Path, text: str) -> Path:
    """``source``'s pixels saved at ``target`` with ``text`` as preempt's metadata chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("preempt", text)
    Image.open(source).save(target, pnginfo=info)
    return target


def test_metadata_made_to_break_a_parser_fails_only_its_file(tmp_path: Path, registry: Path) -> None:
    """A 4 KB PNG whose preempt chunk nests 1,500 arrays (RecursionError in json), or records a backbone
    that is no name, ended whole protect and revert runs with an internal error."""
    good, other = _images(tmp_path / "in", n=2)
    nested = _with_preempt_text(other, tmp_path / "in" / "nested.protected.png", "[" * 1500)
    meta = {"kind": "protected", "backbone": None, "eps": 8 / 255, "eta": 0.7, "forward_steps": 1,
            "backward_steps": 2, "samples": 3, "sample_projection": "original", "inner_steps": 1, "seed": 0}  # fmt: skip
    nameless = _with_preempt_text(other, tmp_path / "in" / "nameless.protected.png", json.dumps(meta))
    result = run(["protect", str(nested), str(good), *FAST, "--labels", "backbone", "-o", str(tmp_path / "p")], registry)
    assert result.exit_code == 0, result.output  # an image like any other: its chunk decides nothing here
    assert (tmp_path / "p" / "img0.protected.png").is_file() and (tmp_path / "p" / "nested.protected.protected.png").is_file()
    assert run(["protect", str(good), *FAST, "--labels", "backbone"], registry).exit_code == 0
    result = run(["revert", str(nested), str(nameless), str(tmp_path / "in" / "img0.protected.png"), "--white-box",
                  "--json", "--device", TEST_DEVICE_ARG, "-o", str(tmp_path / "r")], registry)  # fmt: skip
    assert result.exit_code == 1, result.output
    rows = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["img0.protected.png"]["status"] == "done"
    assert "not a valid record" in rows["nested.protected.png"]["reason"]
    assert "recorded backbone None is not a model name" in rows["nameless.protected.png"]["reason"]
    assert "internal error" not in result.stderr


def test_an_empty_input_path_is_a_usage_error_not_the_current_folder(tmp_path: Path, registry: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _images(tmp_path / "sub", n=1)
    monkeypatch.chdir(tmp_path)
    result = run(["protect", "", *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 2 and "an empty input path (an unset variable?)" in result.stderr
    assert not list(tmp_path.rglob("*.protected.png"))


def test_a_quoted_tilde_out_dir_is_checked_and_written_at_home(tmp_path: Path, registry: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    (good,) = _images(tmp_path / "in", n=1)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert run(["protect", str(good), *FAST, "--labels", "backbone", "-o", "~/out"], registry).exit_code == 0
    assert (tmp_path / "home" / "out" / "img0.protected.png").is_file() and not (tmp_path / "~").exists()
    result = run(["protect", str(good), *FAST, "--labels", "backbone", "-o", "-"], registry)
    assert result.exit_code == 2 and "'-' is no folder" in result.stderr and not (tmp_path / "-").exists()


def test_a_quoted_tilde_is_the_home_folder_for_eval_and_convert_too(tmp_path: Path, registry: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # eval checked $HOME/evt and wrote ./~/evt (the bug 0.16.0 fixed for protect -o); convert wrote ./~/c...
    _images(tmp_path / "data" / "cat", n=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = run(["eval", "data", "--victim", "tiny-key", "--defense", "none", "--attack", "pgd:steps=1", "--out",
                  "~/evt", "--csv", "~/rows.csv", "--device", TEST_DEVICE_ARG, "-q"], registry)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "home" / "evt" / "results.json").is_file() and (tmp_path / "home" / "rows.csv").is_file()
    # run.json keeps the options as typed, and the paths as this run read and wrote them (a '~' or a relative
    # path says nothing once the run's shell and folder are gone)
    run_json = json.loads((tmp_path / "home" / "evt" / "run.json").read_text())
    assert run_json["command_options"]["out"] == "~/evt"
    resolved = run_json["resolved_paths"]
    assert resolved["labels_file"] is None and all(os.path.isabs(resolved[k]) for k in ("data", "out", "csv_path"))
    assert {k: os.path.realpath(resolved[k]) for k in ("data", "out", "csv_path")} == {  # a /tmp link (macOS)
        "data": os.path.realpath(tmp_path / "data"), "out": os.path.realpath(tmp_path / "home" / "evt"),
        "csv_path": os.path.realpath(tmp_path / "home" / "rows.csv")}  # fmt: skip
    assert run_json["weights_sha256_of"] == {"tiny-key": "file"}
    torch.save({"w": torch.zeros(2)}, tmp_path / "home" / "c.pt")
    assert CliRunner().invoke(app, ["models", "convert", "~/c.pt", "~/c.safetensors"]).exit_code == 0
    assert (tmp_path / "home" / "c.safetensors").is_file() and not (tmp_path / "~").exists()
    # where preempt < 0.17 wrote it (./~/evt), a resume says that it does not read it, and where to move it
    (tmp_path / "~" / "evt").mkdir(parents=True)
    resumed = run(["eval", "data", "--victim", "tiny-key", "--defense", "none", "--attack", "pgd:steps=1", "--out",
                   "~/evt", "--resume", "--device", TEST_DEVICE_ARG], registry)  # fmt: skip
    assert resumed.exit_code == 0 and f"it is not resumed; move it to {tmp_path / 'home' / 'evt'}" in resumed.stderr


def test_a_tilde_name_that_is_no_home_is_a_file_name(tmp_path: Path, registry: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``~x.png`` (a file of that name; no user x) ended the whole run with "internal error: RuntimeError:
    Could not determine home directory", named or listed on stdin; a listed ``~root/a.png`` was taken as
    /root/a.png, where stdin's paths are taken as they are."""
    (img,) = _images(tmp_path, n=1)
    os.rename(img, tmp_path / "~nosuchuser.png")
    monkeypatch.chdir(tmp_path)
    for args, listing in ((["~nosuchuser.png"], None), (["-"], "~nosuchuser.png\n")):
        result = run(["protect", *args, *FAST, "--labels", "backbone", "--json", "--overwrite"], registry, input=listing)
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["output"] == "~nosuchuser.protected.png"
    listed = run(["protect", "-", *FAST, "--labels", "backbone", "--json"], registry, input="~root/a.png\n")
    assert listed.exit_code == 1 and json.loads(listed.stdout)["input"] == "~root/a.png"
    assert "its ~ was not expanded" in json.loads(listed.stdout)["reason"]  # 0.16.0 expanded it: say so
    missing = run(["protect", "~nosuchuser/a.png", *FAST, "--labels", "backbone"], registry)
    assert missing.exit_code == 1 and "~nosuchuser/a.png: no such file" in missing.stderr


def test_a_folder_the_walk_cannot_list_fails_as_an_input(tmp_path: Path) -> None:
    """A path past 4,096 bytes deep in a tree (os.scandir: ENAMETOOLONG) ended the run in rglob; now the
    folder fails, saying why, and the rest of the tree is taken."""
    (shallow,) = _images(tmp_path / "tree", n=1)
    deep = tmp_path / "tree"
    fd = os.open(deep, os.O_RDONLY)
    try:  # built with *at calls, each name short: the whole path is past PATH_MAX
        for _ in range(25):
            os.mkdir("d" * 200, dir_fd=fd)
            fd, old = os.open("d" * 200, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
    finally:
        os.close(fd)
    items = {item.path == shallow: item for item in collect_inputs([tmp_path / "tree"])}
    assert len(items) == 2 and items[True].unlisted is None and items[False].unlisted == "File name too long"
    assert read_failure(items[False], "cannot read: File name too long") == (
        "a folder that cannot be listed (File name too long): its images are left out")


def test_a_label_file_that_is_not_utf8_is_a_one_line_usage_error(tmp_path: Path, registry: Path) -> None:
    (good,) = _images(tmp_path, n=1)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"file,label\ncaf\xe9.png,cat\n")  # what Excel saves in a Windows code page
    result = run(["protect", str(good), *FAST, "--labels", str(labels)], registry)
    assert result.exit_code == 2 and f"error: {labels}: not UTF-8 text (line 2); save it as UTF-8" in result.stderr
    nested = tmp_path / "labels.json"
    nested.write_text("[" * 100_000)
    result = run(["protect", str(good), *FAST, "--labels", str(nested)], registry)
    assert result.exit_code == 2 and f"{nested}: not valid JSON" in result.stderr, result.output


def test_an_output_cut_short_is_made_again_not_skipped(tmp_path: Path, registry: Path) -> None:
    (good,) = _images(tmp_path, n=1)
    assert run(["protect", str(good), *FAST, "--labels", "backbone"], registry).exit_code == 0
    output = tmp_path / "img0.protected.png"
    whole = output.read_bytes()
    output.write_bytes(whole[: len(whole) // 2])  # its metadata chunk, which comes first, is whole
    result = run(["protect", str(good), *FAST, "--labels", "backbone"], registry)
    assert result.exit_code == 0 and "is cut short: it is made again" in result.stderr
    assert output.read_bytes() == whole  # the same seed: the same file
    result = run(["protect", str(good), *FAST, "--labels", "backbone"], registry)
    assert "skipped 1" in result.stderr


def test_shards_are_ascii_digits_only() -> None:
    for text in ("1_0/2_0", "\u0661/\u0662", "1/2/3", "a/b"):
        with pytest.raises(ConfigError, match="--shard must look like K/N"):
            parse_shard(text)
    assert parse_shard(" 2 / 4 ") == (2, 4)


def test_a_shard_counted_from_0_says_how_a_job_array_numbered_so_counts() -> None:
    """``--shard 0/4`` (Slurm numbers array tasks from 0) said only "needs 1 <= K <= N"."""
    with pytest.raises(ConfigError, match=re.escape("counts K from 1, got '0/4' (a job array numbered from 0: "
                                                    "--shard $((SLURM_ARRAY_TASK_ID + 1))/4)")):  # fmt: skip
        parse_shard("0/4")
    for text in ("5/4", "0/0"):
        with pytest.raises(ConfigError, match="needs 1 <= K <= N"):
            parse_shard(text)


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="/dev/fd")
@pytest.mark.parametrize(("text", "label"), [(b"file,label\nimg0.png,3\n", 3), (b'{"img0.png": 4}', 4)])
def test_labels_can_come_from_a_pipe(tmp_path: Path, registry: Path, text: bytes, label: int) -> None:
    """``--labels <(make-labels)``: /dev/fd/N is a pipe, no regular file, and was refused as no label file;
    its name has no .json, so its content says whether it is JSON (JSON was parsed as CSV)."""
    (good,) = _images(tmp_path, n=1)
    read_end, write_end = os.pipe()
    os.write(write_end, text)
    os.close(write_end)
    try:
        result = run(["protect", str(good), *FAST, "--labels", f"/dev/fd/{read_end}", "--json"], registry)
    finally:
        os.close(read_end)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label"] == label


def test_an_eps_under_one_level_warns_that_8_bit_outputs_equal_their_originals(tmp_path: Path, registry: Path) -> None:
    (good,) = _images(tmp_path, n=1)
    result = run(["protect", str(good), *FAST, "--labels", "backbone", "--eps", "0.003"], registry)
    assert result.exit_code == 0
    assert "warning: eps 0.003 is under one level of an 8-bit image (1/255)" in result.stderr
    assert "warning" not in run(["protect", str(good), *FAST, "--labels", "backbone", "--overwrite"], registry).stderr
    # METHOD.md's rule eta x (T-> + T<-) > 1, not enforced nor said (0.3 x 3 = 0.9)
    weak = run(["protect", str(good), *FAST, "--labels", "backbone", "--eta", "0.3", "--overwrite"], registry)
    assert weak.exit_code == 0 and "warning: eta x (forward + backward steps) = 0.9 is not above 1" in weak.stderr


def test_a_label_file_edited_since_is_a_changed_setting_on_a_rerun(tmp_path: Path, registry: Path) -> None:
    """Re-runs compared the label file's name, not the labels: an edited file's outputs were skipped as
    done, still pushed toward the old classes."""
    _images(tmp_path / "in", n=2)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nimg0.png,0\nimg1.png,1\n")
    args = ["protect", str(tmp_path / "in"), *FAST, "--labels", str(labels), "--json"]
    assert run(args, registry).exit_code == 0
    assert {json.loads(r)["status"] for r in run(args, registry).stdout.splitlines()} == {"skipped"}
    labels.write_text("file,label\nimg0.png,0\nimg1.png,2\n")
    result = run(args, registry)
    rows = {Path(r["input"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert result.exit_code == 1 and rows["img0.png"]["status"] == "skipped"
    assert rows["img1.png"]["status"] == "failed" and "(label " in rows["img1.png"]["reason"], rows["img1.png"]
    assert "--overwrite" in rows["img1.png"]["reason"]
    assert "(label now bird)" in rows["img1.png"]["reason"]
    redone = run([*args, "--overwrite"], registry)
    assert redone.exit_code == 0
    assert {json.loads(r)["status"] for r in run(args, registry).stdout.splitlines()} == {"skipped"}
    # the same labels from a renamed file (or a pipe) are the same setting: each file's label is compared
    labels.rename(tmp_path / "renamed.csv")
    renamed = [a if a != str(labels) else str(tmp_path / "renamed.csv") for a in args]
    assert {json.loads(r)["status"] for r in run(renamed, registry).stdout.splitlines()} == {"skipped"}
    from preempt_cli.protect import differing_settings  # outputs of 0.18.0 and earlier named the file

    assert differing_settings({"labels": "file:old.csv"}, {"labels": "file"}) == []
    assert differing_settings({"labels": "file:old.csv"}, {"labels": "folders"}) == ["labels file:old.csv -> folders"]


@pytest.mark.parametrize("labels", ["file", "folders", "backbone"])
def test_outputs_do_not_publish_the_label_they_were_protected_toward(tmp_path: Path, registry: Path, labels: str) -> None:
    """An output's metadata is published with it, and the defender's label is what a reversion attack
    lacks (given it, reversion recovered 73-100% of the accuracy protection took: eval_tables.md). Each
    output said it ("label", "label_name"). Now a label from a file or folder is recorded as a digest keyed
    by the original's bytes, which a re-run compares; guesses from what the metadata shows do not match it."""
    from preempt_cli.protect import label_digest

    (image,) = _images(tmp_path / "in" / "cat", n=1)  # class 3 of CIFAR-10
    label_file = tmp_path / "labels.csv"
    label_file.write_text("file,label\nimg0.png,3\n")
    source = {"file": str(label_file), "folders": "folders", "backbone": "backbone"}[labels]
    result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", source, "--json"], registry)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label"] == (3 if labels != "backbone" else json.loads(result.stdout)["label"])
    meta = json.loads(Image.open(image.with_name("img0.protected.png")).text["preempt"])
    assert "label" not in meta and "label_name" not in meta
    if labels == "backbone":  # a model's label: nothing to compare on a re-run, nothing recorded
        assert "label_digest" not in meta
        return
    published = bytes.fromhex(meta["source_sha256"])
    assert all(meta["label_digest"] != label_digest(c, key) for c in range(10) for key in (published, b""))
    assert meta["label_digest"] == label_digest(3, hashlib.blake2b(image.read_bytes(), digest_size=32,
                                                                   person=b"preempt-label").digest())  # fmt: skip


def test_a_run_asking_for_other_workers_leaves_the_pool_of_another_run_alone(tiny_backbone) -> None:
    """One Protector shared by threads: a run with --workers 3 shut down the worker processes of a run with
    2 under way ("cannot schedule new futures after shutdown"). Each number of workers has its pool."""
    from preempt_cli import ForeBackConfig, Protector

    with Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2)) as protector:
        two = protector._process_pool(RunOptions(io="processes", workers=2), use=True)  # a run under way
        three = protector._process_pool(RunOptions(io="processes", workers=3))
        assert two is not three and two.submit(os.getpid).result(timeout=60) != os.getpid()
        assert protector._process_pool(RunOptions(io="processes", workers=3)) is three  # kept for later runs
        protector._pool_users[2] -= 1  # the run ends
        protector._process_pool(RunOptions(io="processes", workers=1))
        assert set(protector._pools) == {1}  # pools of other sizes that no run uses are not kept
    assert protector._processes is None and protector._pools == {}


def test_each_run_of_a_protector_batches_by_its_own_batch_size(tmp_path: Path, tiny_backbone,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import ForeBackConfig, Protector

    _images(tmp_path / "in", n=12)
    sizes: list[int] = []
    compute = Protector._compute
    monkeypatch.setattr(Protector, "_compute", lambda self, batch: sizes.append(len(batch)) or compute(self, batch))
    protector = Protector(tiny_backbone, labels="backbone", config=ForeBackConfig(samples=2))
    for batch_size, out in ((2, "a"), (6, "b")):
        sizes.clear()
        results = list(protector.run(collect_inputs([tmp_path / "in"]), RunOptions(out_dir=tmp_path / out,
                                                                                  batch_size=batch_size)))  # fmt: skip
        assert [r.status for r in results] == ["done"] * 12
        assert max(sizes) == batch_size, (batch_size, sizes)  # the second run took the first one's 2


@pytest.mark.parametrize(("args", "line"), [
    (["protect", "--bogus"], "error: No such option: --bogus"),
    (["protect"], "error: Missing argument 'PATH...' (see 'preempt protect --help')"),
    (["models", "show"], "error: Missing argument 'NAME' (see 'preempt models show --help')"),
    (["bogus"], "error: No such command 'bogus' (see 'preempt --help')"),
])  # fmt: skip
def test_usage_errors_of_the_parser_are_one_line_too(args: list[str], line: str) -> None:
    """Typer drew click's usage errors as a rich panel of five lines, into pipes and logs too."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith(line) and len(result.stderr.splitlines()) == 1, result.stderr
    # as `python -m preempt_cli` too (the program's name is not the command's: it drew the panel)
    named = CliRunner().invoke(app, args, prog_name="python -m preempt_cli")
    assert named.exit_code == 2 and len(named.stderr.splitlines()) == 1, named.stderr
    assert named.stderr.startswith(line.replace("'preempt ", "'python -m preempt_cli "))


def test_a_name_stdouts_codec_cannot_write_is_written_as_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ASCII (or code-page) stdout and a name of other letters ended the run after its outputs were
    written; the name goes out as the file system's bytes, as ls writes it."""
    import io

    from preempt_cli.cli import _common

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    _common.print_line("out/caf\u00e9.protected.png")
    assert raw.getvalue() == "out/caf\u00e9.protected.png\n".encode()


@pytest.mark.parametrize(("eps", "said"), [("1e400", "invalid eps '1e400'"), ("nan", "invalid eps 'nan'")])
def test_an_eps_past_floats_is_a_usage_error(tmp_path: Path, registry: Path, eps: str, said: str) -> None:
    """1e400 ended the run with an internal OverflowError from Fraction -> float."""
    (good,) = _images(tmp_path, n=1)
    result = run(["protect", str(good), *FAST, "--labels", "backbone", "--eps", eps], registry)
    assert result.exit_code == 2 and said in result.stderr and "internal" not in result.stderr


def test_white_box_reversion_checks_seed_and_precision_before_any_work(tmp_path: Path, registry: Path) -> None:
    """They were checked per group of files after the models loaded: every file failed, exit 1."""
    _images(tmp_path, n=1)
    for option, value, said in (("--seed", "-1", "seed must be in 0..2**64-1"),
                                ("--precision", "fp16", "precision must be one of fp32, bf16, auto")):  # fmt: skip
        result = run(["revert", str(tmp_path), "--white-box", option, value, "--device", TEST_DEVICE_ARG], registry)
        assert result.exit_code == 2 and said in result.stderr, result.output


def test_preempt_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path, registry: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """With PREEMPT_DEBUG=1 a usage error left as a traceback, exit 1; it is still exit 2, with the traceback."""
    (good,) = _images(tmp_path, n=1)
    monkeypatch.setenv("PREEMPT_DEBUG", "1")
    result = run(["protect", str(good), *FAST, "--labels", "backbone", "--eps", "0"], registry)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("error: eps must be positive, got '0'")


def test_a_row_set_up_otherwise_for_the_same_weights_is_another_model_on_a_rerun(tmp_path: Path, registry: Path) -> None:
    """Outputs recorded the backbone's weights alone: after a registry row was fixed (another shortcut,
    normalization or class order for the same file), a re-run skipped the outputs made under the old row
    and white-box revert used the new one without a word. 0.17.0's outputs record the row's setup too."""
    _images(tmp_path / "p", n=1)
    assert run(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone"], registry).exit_code == 0
    meta = json.loads(Image.open(tmp_path / "p" / "img0.protected.png").text["preempt"])
    assert len(meta["backbone_setup"]) == 16
    fixed = tmp_path / "fixed.toml"  # the registry with tiny-key's weights fed with another normalization
    text = registry.read_text().replace('"file:key.safetensors"', f'"file:{registry.parent}/key.safetensors"')
    normalized = '[models.tiny-key]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n'
    fixed.write_text(text.replace("[models.tiny-key]\n", normalized))

    def run_fixed(args: list[str]):
        return CliRunner().invoke(app, [*args, "--registry", str(fixed)], catch_exceptions=False)

    again = run_fixed(["protect", str(tmp_path / "p"), *FAST, "--labels", "backbone", "--json"])
    assert again.stdout, again.stderr
    row = json.loads(again.stdout)
    assert row["status"] == "failed" and "backbone_setup" in row["reason"], row
    white_box = ["revert", str(tmp_path / "p" / "img0.protected.png"), "--white-box", "--device", TEST_DEVICE_ARG]
    refused = run_fixed(white_box)  # not the recorded defense: a white-box reversion refuses it (warned, exit 0)
    assert refused.exit_code == 1 and not (tmp_path / "p" / "img0.protected.reverted.png").exists()
    assert "backbone tiny-key is set up otherwise (registry row" in refused.stderr
    reverted = run_fixed([*white_box, "--allow-changed-models"])
    assert reverted.exit_code == 0, reverted.stderr
    assert "backbone tiny-key is set up otherwise (registry row" in reverted.stderr


# -- --log FILE ------------------------------------------------------------------------------------------------
_LOG_HEAD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \[(\d+)\] (debug|info|warning|error): ")


def _log_lines(path: Path, pid: int | None = None) -> list[str]:
    """The lines of a ``--log`` file as ``level: message``, once each is checked to be whole (a timestamp,
    a process id, ``pid`` where given, and a level) and plain (no escape codes, no rich markup)."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\x1b" not in text and "[bold" not in text and "[/]" not in text
    lines = []
    for line in text.splitlines():
        head = _LOG_HEAD.match(line)
        assert head, line
        assert pid is None or int(head.group(1)) == pid, line
        lines.append(f"{head.group(2)}: {line[head.end():]}")
    return lines


def test_a_log_file_holds_the_whole_run_whatever_q_says_and_stdout_is_unchanged(tmp_path: Path,
                                                                                registry: Path) -> None:  # fmt: skip
    _images(tmp_path / "in", n=2)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    log = tmp_path / "logs" / "array" / "run.log"  # its folders are created
    args = ["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "--overwrite"]
    for quiet in ([], ["-q"]):
        plain = run([*args, *quiet], registry)
        logged = run([*args, *quiet, "--log", str(log)], registry)
        assert plain.exit_code == logged.exit_code == 1
        assert logged.stdout_bytes == plain.stdout_bytes and logged.stdout.count(".protected.png\n") == 2
    lines = _log_lines(log, pid=os.getpid())
    starts = [i for i, line in enumerate(lines) if line.startswith(f"info: preempt {__version__} (Python ")]
    assert len(starts) == 2 and starts[0] == 0  # appended: the second run after the first
    for run_lines, quiet in ((lines[starts[0]:starts[1]], []), (lines[starts[1]:], ["-q"])):
        assert run_lines[1] == f"info: command line: preempt {' '.join([*args, *quiet, '--log', str(log)])} --registry {registry}"
        settings = [line for line in run_lines if line.startswith("debug: settings of protect: {")]
        assert len(settings) == 1 and f'"quiet": {"true" if quiet else "false"}' in settings[0]
        assert f"error: {broken}: not an image Pillow can read (unknown or corrupt format)" in run_lines
        assert sum(line.startswith("info: Protected 2, skipped 0, failed 1 in ") for line in run_lines) == 1
        assert sum(line.startswith("debug: stdout: ") and line.endswith(".protected.png") for line in run_lines) == 2
        assert any(line.startswith("debug: loaded tiny-key from ") for line in run_lines)  # the library's records
        assert run_lines[-1].startswith("warning: exit code 1 (some inputs failed) after ")


def test_a_log_file_that_cannot_be_opened_is_a_usage_error_before_any_work(tmp_path: Path, registry: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli.cli import _files

    (image,) = _images(tmp_path / "in", n=1)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(_files, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    for log, why in ((tmp_path / "a-file" / "logs" / "run.log", f"({tmp_path / 'a-file'} is a file)"),
                     (tmp_path / "a-file" / "run.log", f"cannot create its folder {tmp_path / 'a-file'} (it is a file)"),
                     (tmp_path, "is a folder")):  # fmt: skip
        # given last, it is still read first: the other options' usage errors come after it
        result = run(["protect", str(image), *FAST, "--labels", "backbone", "--samples", "many", "--log", str(log)],
                     registry)  # fmt: skip
        assert result.exit_code == 2 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and f"{log}: " in result.stderr and why in result.stderr, result.stderr
        assert "'--log'" in result.stderr
    # a folder named so (a Path of it drops the /): the log went to a file named as the folder
    for env, given in (({}, ["--log", f"{tmp_path / 'logs'}/"]), ({"PREEMPT_LOG": f"{tmp_path / 'logs'}/"}, [])):
        result = run(["protect", str(image), *FAST, "--labels", "backbone", *given], registry, env=env)
        assert result.exit_code == 2 and f"{tmp_path / 'logs'}/: names a folder; name a file in it" in result.stderr
        assert not (tmp_path / "logs").exists()
    # nor one opened to record a usage error that stopped the parser before --log was read
    result = run(["protect", str(image), "--no-such-option", "--log", f"{tmp_path / 'logs'}/"], registry)
    assert result.exit_code == 2 and not (tmp_path / "logs").exists()
    # '-', refused, was then opened to record its own refusal: a file named - in the current folder
    monkeypatch.chdir(tmp_path)
    result = run(["protect", str(image), *FAST, "--labels", "backbone", "--log", "-"], registry)
    assert result.exit_code == 2 and "'-' is no file" in result.stderr
    assert not (tmp_path / "-").exists()
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["img0.png"]
    assert (tmp_path / "a-file").read_text() == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_log_file_that_is_a_pipe_nothing_reads_is_a_usage_error_and_one_that_is_read_gets_the_log(
        tmp_path: Path, registry: Path) -> None:  # fmt: skip
    """``--log`` naming a named pipe with no reader waited forever at its opening, before any work."""
    import threading

    (image,) = _images(tmp_path / "in", n=1)
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = run(["protect", str(image), *FAST, "--log", str(fifo)], registry)
    assert result.exit_code == 2 and time.monotonic() - started < 30
    assert len(result.stderr.splitlines()) == 1 and f"{fifo}: a named pipe that nothing reads" in result.stderr

    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader from now on
    got, done = bytearray(), threading.Event()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:  # a writer, nothing written yet
                chunk = None
            if chunk:
                got.extend(chunk)
            elif done.is_set():
                return
            else:
                time.sleep(0.01)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        result = run(["protect", str(image), *FAST, "--labels", "backbone", "--log", str(fifo)], registry)
    finally:
        done.set()
        reader.join(timeout=30)
        os.close(fd)
    assert result.exit_code == 0 and b"exit code 0" in got, result.stderr


_APPENDER = """
import pathlib, sys, time
from preempt_cli.cli._logfile import open_log_file
log = open_log_file(pathlib.Path(sys.argv[1]))
tag = sys.argv[2]
pathlib.Path(sys.argv[3], tag).touch()  # ready
while not pathlib.Path(sys.argv[3], "go").exists():
    time.sleep(0.001)
for i in range(300):  # records of 3 lines, 12 KB: more than a pipe's atomic 4 KB
    log.say("\\n".join(f"{tag} {i} {j} " + tag * 4000 for j in range(3)))
log.close()
"""


def test_processes_appending_to_one_log_file_leave_whole_lines_and_records(tmp_path: Path) -> None:
    log, flags = tmp_path / "shared.log", tmp_path / "flags"
    flags.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(log), tag, str(flags)], env=_child_env())
               for tag in "AB"]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((flags / "A").exists() and (flags / "B").exists()) and time.monotonic() < deadline:
            time.sleep(0.01)
        (flags / "go").touch()  # both write at once
        assert [w.wait(timeout=120) for w in writers] == [0, 0]
    finally:
        for w in writers:
            w.kill()
    lines = _log_lines(log)
    assert len(lines) == 2 * 300 * 3
    seen = {"A": 0, "B": 0}
    for at in range(0, len(lines), 3):  # each record's 3 lines together, each line whole
        tag, i = lines[at].split()[1], seen[lines[at].split()[1]]
        assert lines[at:at + 3] == [f"info: {tag} {i} {j} " + tag * 4000 for j in range(3)]
        seen[tag] += 1
    assert seen == {"A": 300, "B": 300}


def test_preempt_log_names_the_log_file(tmp_path: Path, registry: Path) -> None:
    log = tmp_path / "env.log"
    result = run(["models", "list", "-q"], registry, env={"PREEMPT_LOG": str(log)})
    assert result.exit_code == 0 and result.stderr == "" and "tiny-key" in result.stdout
    lines = _log_lines(log)
    assert lines[1] == f"info: command line: preempt models list -q --registry {registry}"
    assert f"info: environment: PREEMPT_LOG={log}" in lines and "debug: from the environment: log (PREEMPT_LOG)" in lines
    assert any(line.startswith("debug: stdout: ") and "tiny-key " in line for line in lines)  # the results too
    assert any(line.startswith("info: registries: ") for line in lines)  # kept from stderr by -q
    assert lines[-1].startswith("info: exit code 0 (all done) after ")
    refused = run(["models", "list"], registry, env={"PREEMPT_LOG": str(tmp_path)})
    assert refused.exit_code == 2 and "PREEMPT_LOG" in refused.stderr and "is a folder" in refused.stderr


def test_a_log_file_records_ctrl_c_usage_and_internal_errors_with_their_exit_codes(tmp_path: Path, registry: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from preempt_cli import Protector
    from preempt_cli.cli import _files

    _images(tmp_path / "in", n=2)
    args = ["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone"]

    def logged(extra: list[str], code: int, log: Path) -> list[str]:
        result = run([*args, *extra, "--log", str(log)], registry)
        assert result.exit_code == code, result.output
        return _log_lines(log)

    def interrupted(self, batch):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Protector, "_compute", interrupted)
        lines = logged(["-q"], 130, tmp_path / "ctrl-c.log")
    assert "error: interrupted: no output was written; run again to do the rest" in lines
    assert lines[-1].startswith("error: exit code 130 (interrupted) after ")
    # usage errors: one the parser meets before --log is read (the log is opened to say it), one after
    lines = logged(["--sampels", "3"], 2, tmp_path / "typo.log")
    assert lines[1].startswith("info: command line: preempt protect ") and "--sampels 3" in lines[1]
    assert lines[2].startswith("error: No such option: --sampels") and lines[3].startswith("error: exit code 2 (usage")
    lines = logged(["--samples", "many"], 2, tmp_path / "value.log")
    assert any(line.startswith("error: Invalid value for '--samples'") for line in lines)
    assert lines[-1].startswith("error: exit code 2 (usage")
    # an internal error: one line on stderr, its traceback in the file
    monkeypatch.setattr(_files, "_labels", lambda value: (_ for _ in ()).throw(RuntimeError("boom")))
    result = run([*args, "--log", str(tmp_path / "internal.log")], registry)
    assert result.exit_code == 2
    assert result.stderr == "error: internal error: RuntimeError: boom (set PREEMPT_DEBUG=1 for the traceback)\n"
    lines = _log_lines(tmp_path / "internal.log")
    assert "error: Traceback (most recent call last):" in lines and "error: RuntimeError: boom" in lines
    assert lines[-1].startswith("error: exit code 2 (usage, setup or internal error)")


def test_io_worker_processes_leave_the_log_file_to_the_main_process(tmp_path: Path, registry: Path) -> None:
    _images(tmp_path / "in", n=4)
    log = tmp_path / "run.log"
    result = run(["protect", str(tmp_path / "in"), *FAST, "--labels", "backbone", "--io", "processes",
                  "--workers", "2", "--log", str(log)], registry)  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = _log_lines(log, pid=os.getpid())  # whole lines, all of this process
    assert lines[-1].startswith("info: exit code 0 (all done)")


def test_a_log_file_keeps_keygen_s_secret_seed_out(tmp_path: Path, registry: Path) -> None:
    log = tmp_path / "keygen.log"
    result = run(["keygen", "--out", str(tmp_path / "key.safetensors"), "--base", "tiny-key", "--data",
                  str(tmp_path / "none"), "--secret-seed", "987654321", "--log", str(log)], registry)  # fmt: skip
    assert result.exit_code == 2
    text = log.read_text()
    assert "987654321" not in text and "--secret-seed '(secret)'" in text and '"secret_seed": "(secret)"' in text


@pytest.fixture
def library_logger():
    """The ``preempt_cli`` logger as a process that never ran the CLI has it (level NOTSET, no handlers,
    propagating), its state put back after the test."""
    import logging

    logger = logging.getLogger("preempt_cli")
    saved = logger.level, list(logger.handlers), logger.propagate
    logger.setLevel(logging.NOTSET)
    logger.handlers.clear()
    logger.propagate = True
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_a_log_file_leaves_the_library_s_logger_as_a_run_without_one_does(tmp_path: Path, registry: Path,
                                                                          library_logger) -> None:  # fmt: skip
    """A process that goes on (a user's Python, the tests) must not keep the logger at debug after a --log
    run: the caller's handlers got every debug record of the library from then on."""
    import logging

    (image,) = _images(tmp_path / "in", n=1)
    mine = logging.Handler()  # a caller's own handler, of no level
    for args in (["protect", str(image), "--samples", "many"],  # a usage error: no setup_logging
                 ["models", "list", "-q"]):  # fmt: skip
        for handlers, level in (([], logging.NOTSET), ([mine], logging.INFO)):
            after = []
            for log in ([], ["--log", str(tmp_path / "run.log")]):
                library_logger.handlers[:] = handlers
                library_logger.setLevel(level)
                run([*args, *log], registry)
                after.append((library_logger.level, mine.level))
            assert after[1] == after[0], (args, handlers)  # the caller's handler left as it was too
            assert after[1][0] != logging.DEBUG and after[1][1] == logging.NOTSET, (args, handlers)
    assert sum("exit code 2" in line for line in _log_lines(tmp_path / "run.log")) == 2


def test_stderr_with_vv_is_the_same_with_or_without_a_log_file(tmp_path: Path, registry: Path) -> None:
    """The lines a --log file adds (the devices, the resolved settings) are the file's: -vv's stderr is
    what it was before --log existed."""
    (image,) = _images(tmp_path / "in", n=1)
    args = ["protect", str(image), *FAST, "--labels", "backbone", "--overwrite", "-vv"]
    for log in ([], ["--log", str(tmp_path / "run.log")]):
        result = run([*args, *log], registry)
        assert result.exit_code == 0, result.output
        assert "debug: loaded tiny-key from " in result.stderr  # -vv's debug lines, the library's
        assert "debug: protecting " not in result.stderr and "debug: computing on " not in result.stderr
    assert any(line.startswith("debug: protecting 1 file(s) on ") for line in _log_lines(tmp_path / "run.log"))


def test_a_log_file_holds_a_table_shown_on_a_terminal(tmp_path: Path, registry: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from rich.console import Console

    from preempt_cli.cli import _common

    monkeypatch.setattr(_common, "stdout", Console(force_terminal=True, soft_wrap=True, highlight=False))
    result = run(["models", "list", "--log", str(tmp_path / "run.log")], registry)
    assert result.exit_code == 0 and "tiny-key" in result.stdout
    assert any(line.startswith("debug: stdout: ") and "tiny-key " in line for line in _log_lines(tmp_path / "run.log"))


def test_a_log_file_that_fills_up_says_so_once_and_its_next_record_starts_a_line(tmp_path: Path, monkeypatch,
                                                                                  capsys) -> None:  # fmt: skip
    """``--log`` on a full file system stopped mid-record without a word (exit 0, the last line
    ``... stdout: {"inpu``, no exit line). The first failed write is said once on stderr, and a record after
    one cut short starts on a line of its own."""
    import errno

    from preempt_cli.cli import _logfile

    log = _logfile.open_log_file(tmp_path / "run.log")
    real_write = os.write
    full = [True]

    def write(fd: int, data: bytes) -> int:  # a disk that takes 10 bytes, then none
        if fd != log._fd or not full[0]:
            return real_write(fd, data)
        if not getattr(write, "took", False):
            write.took = True  # type: ignore[attr-defined]
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        log.say("first record, whole")
        monkeypatch.setattr(_logfile.os, "write", write)
        log.say("second record, cut short")
        log.say("third record, lost")
        full[0] = False  # space freed
        log.say("fourth record")
    finally:
        log.close()
    warned = [line for line in capsys.readouterr().err.splitlines() if "--log" in line]
    assert warned == [f"warning: --log {tmp_path / 'run.log'}: cannot write (No space left on device); the log is "
                      "incomplete from here"]  # fmt: skip
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert len(lines) == 3 and lines[0].endswith("info: first record, whole") and len(lines[1]) == 10
    assert lines[2].endswith("info: fourth record")


def test_files_past_pillows_own_limit_keep_their_metadata_under_a_raised_max_pixels(tmp_path: Path, registry: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Pillow refuses to open an image of more than twice its process-wide limit (89 Mpx by default) before
    a run's first decode raises that limit to --max-pixels: so the metadata read before it found none.
    A 200-megapixel scan protected with --max-pixels 300000000 then failed its white-box reversion as
    "no preempt metadata (not protected by preempt?)", and a re-run of protect or revert failed it as
    "exists and is not a file preempt protected" instead of skipping it. Here a limit of 400 pixels stands
    in for Pillow's default: the 32x32 test images (1,024 pixels) are past twice it."""
    (image,) = _images(tmp_path / "big", n=1)
    protected, reverted = image.with_name("img0.protected.png"), image.with_name("img0.protected.reverted.png")
    raised = ["--max-pixels", "5000"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    assert run(["protect", str(image), *FAST, "--labels", "backbone", *raised], registry).exit_code == 0
    for args, status in ((["protect", str(image), *FAST, "--labels", "backbone"], "skipped"),
                         (["revert", str(protected), "--white-box", "--device", TEST_DEVICE_ARG], "done"),
                         (["revert", str(protected), "--white-box", "--device", TEST_DEVICE_ARG], "skipped")):  # fmt: skip
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # as a new process finds it: each run raises it
        result = run([*args, *raised, "--json"], registry)
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert result.exit_code == 0 and [r["status"] for r in rows] == [status], (args, result.output)
    assert json.loads(Image.open(reverted).text["preempt"])["kind"] == "reverted"
    # the library alike (Protector.run judges an existing output by its metadata before any decode)
    from preempt_cli import ForeBackConfig, Protector, load_model

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    protector = Protector(load_model("tiny-key", registry=[registry], device=TEST_DEVICE), labels="backbone",
                          config=ForeBackConfig.from_preset("paper", samples=3))  # fmt: skip
    assert [r.status for r in protector.run([image], RunOptions(max_pixels=5000))] == ["skipped"]


def test_a_log_file_holds_the_settings_each_reversion_ran_with(tmp_path: Path, registry: Path) -> None:
    """The README's --log holds "the settings as resolved (defaults included) with the devices and models";
    revert's held only its options as given (eps null, and nothing of the defenses --white-box read from
    the files): a researcher's log could not say with which budget, steps, seed or models a reversion ran."""
    _images(tmp_path / "r", n=1)
    assert run(["protect", str(tmp_path / "r"), *FAST, "--labels", "backbone", "--seed", "4"], registry).exit_code == 0
    protected = tmp_path / "r" / "img0.protected.png"
    log = tmp_path / "run.log"
    white = run(["revert", str(protected), "--white-box", "-o", str(tmp_path / "wb"), "--log", str(log), "-vv",
                 "--device", TEST_DEVICE_ARG], registry)  # fmt: skip
    black = run(["revert", str(protected), "-b", "tiny-key", "-c", "tiny-labeller-unpinned", "--eta", "0.9",
                 "-o", str(tmp_path / "bb"), "--log", str(log), "--device", TEST_DEVICE_ARG], registry)  # fmt: skip
    assert white.exit_code == 0 and black.exit_code == 0, white.output + black.output
    assert "debug: reverting" not in white.stderr  # the file's line: -vv's stderr is as before
    lines = [line for line in _log_lines(log) if line.startswith("debug: reverting ")]
    assert len(lines) == 2, _log_lines(log)
    assert lines[0].startswith(f"debug: reverting 1 file(s) white-box on {TEST_DEVICE} with the defense recorded in them: "
                               "tiny-key and no classifier (labels: backbone, seed 4, precision fp32): {'eps': 0.0313")  # fmt: skip
    assert "'samples': 3" in lines[0] and "'preset': 'paper'" in lines[0]
    assert lines[1].startswith(f"debug: reverting 1 file(s) on {TEST_DEVICE} with tiny-key and tiny-labeller-unpinned "
                               "(labels: classifier, seed 0, precision fp32): {'eps': 0.0313")  # fmt: skip
    assert "'eta': 0.9" in lines[1] and "'samples': 20" in lines[1]


def _option_metavars() -> dict[str, dict[str, str]]:
    """Each option that takes a value: its metavar as the help shows it, per command (``models verify``...)."""
    import typer.main

    root = typer.main.get_command(app)
    ctx = root.make_context("preempt", ["--help"], resilient_parsing=True)
    shown: dict[str, dict[str, str]] = {}

    def walk(command, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for param in command.params if not hasattr(command, "commands") else ():
            if param.param_type_name == "option" and not param.is_flag and not param.count:
                # typer >= 0.29 shows a metavar through display_type_rich; earlier ones through click's own
                show = getattr(param, "display_type_rich", None) or param.make_metavar
                shown.setdefault(param.opts[0], {})[path] = show(ctx)

    walk(root, "")
    return shown


def _argument_help() -> dict[str, list[tuple[str, str, str | None]]]:
    """Each command's arguments as its help shows them: (usage line piece, name in the Arguments panel, type
    column: None where the installed Typer shows none, as 0.28 never does from this API)."""
    import typer.main

    root = typer.main.get_command(app)
    ctx = root.make_context("preempt", ["--help"], resilient_parsing=True)
    shown: dict[str, list[tuple[str, str, str | None]]] = {}

    def walk(command, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for param in command.params:
            if param.param_type_name == "argument":
                # typer >= 0.29 names it through display_name_raw, 0.28 through its metavar
                name = getattr(param, "display_name_raw", None) or param.metavar or param.name
                show_type = getattr(param, "display_type_rich", None)
                piece = " ".join(param.get_usage_pieces(ctx))
                shown.setdefault(path, []).append((piece, name, show_type(ctx) if show_type else None))

    walk(root, "")
    return shown


def test_arguments_show_their_metavar_as_the_options_do() -> None:
    """Arguments were missed by the options' clean-up: the usage line said ``{paths}...`` and ``{data}``,
    the help ``<list[str]>`` (as if one value held a list) and ``<path>`` beside them. Each now shows one
    metavar, the README's, in the usage line and the help alike."""
    expected = {"protect": ["PATH..."], "revert": ["PATH..."], "eval": ["DATA"], "train": ["DATA"],
                "models show": ["NAME"], "models verify": ["NAME..."],
                "models convert": ["CHECKPOINT", "OUTPUT"]}  # fmt: skip
    shown = _argument_help()
    assert {path: [piece for piece, _, _ in arguments] for path, arguments in shown.items()} == expected
    for path, arguments in shown.items():
        for piece, name, type_column in arguments:
            assert name == piece and type_column is None, (path, piece, name, type_column)


def test_options_show_one_metavar_per_kind_of_value_across_commands() -> None:
    """The help named the same value three ways (--out-dir <Path>, --models-dir <path>, --log FILE) and a
    repeatable option as a list (--registry <list[Path]>, --victim <list[str]>), as if it took several values
    at once: each occurrence takes one (--registry A --registry B)."""
    shown = _option_metavars()
    for option, by_command in shown.items():
        if option != "--out":  # the same in every command (--out: see below)
            assert len(set(by_command.values())) == 1, (option, by_command)
        assert not any(m.startswith("<list") for m in by_command.values()), (option, by_command)
    expected = {"--models-dir": "DIR", "--out-dir": "DIR", "--registry": "FILE", "--log": "FILE", "--csv": "FILE",
                "--labels-file": "FILE", "--backbone": "NAME", "--classifier": "NAME", "--victim": "NAME",
                "--base": "NAME", "--reversion-backbone": "NAME", "--reversion-classifier": "NAME",
                "--defense": "SPEC", "--attack": "SPEC", "--arch-arg": "KEY=VALUE", "--strip-prefix": "PREFIX",
                "--shard": "K/N"}  # fmt: skip
    assert {option: next(iter(shown[option].values())) for option in expected} == expected
    # --out: a folder for eval, a weights file for train and keygen
    assert shown["--out"] == {"eval": "DIR", "train": "FILE", "keygen": "FILE"}


@pytest.mark.parametrize("command", [["protect"], ["revert"], ["eval"], ["train"], ["keygen"], ["models", "list"],
                                     ["models", "verify"], ["models", "convert"]])  # fmt: skip
def test_flags_show_no_value_in_the_help(command: list[str]) -> None:
    """Typer 0.29 put a type beside every flag, ``--json <bool>``, ``--overwrite <bool>``, and beside the
    counted ``-v``, ``--verbose <int>``: as if they took a value (``--json true``, ``-v 2``, which read the
    value as a path). A flag is named alone, as the README names it."""
    text = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).stdout
    rows = [line for line in text.splitlines() if re.search(r"│ +(\*\s+)?--", line)]
    assert any("--help" in row for row in rows), text
    assert [row for row in rows if "<bool>" in row] == []
    assert [row for row in rows if re.search(r"--verbose\s.*<int>", row)] == []
    # options that take a value keep theirs (Typer 0.28 names the type as Click does)
    samples = [row for row in rows if re.search(r"--samples\s", row)]
    assert command[0] not in ("protect", "revert") or re.search(r"<int>|INTEGER", samples[0]), samples


def test_eval_help_says_what_its_seed_seeds() -> None:
    """eval's --seed said protect's "Seed of the noise; same seed + device = same output": it is the seed of the
    defenses whose spec sets none (and of the reversion's flipped labels), not the attacks' (their spec's seed=),
    and an AutoAttack row does not reproduce on another batch whatever the seed."""
    import typer.main

    [seed] = [p for p in typer.main.get_command(app).commands["eval"].params if "--seed" in p.opts]
    assert "same seed + device = same output" not in seed.help
    assert "defense" in seed.help and "seed=" in seed.help, seed.help


@pytest.mark.parametrize("command", [["models", "verify", "tiny-key"], ["models", "convert"]])
def test_models_verify_and_convert_take_verbose_as_the_other_commands(tmp_path: Path, registry: Path,
                                                                     command: list[str]) -> None:
    """`-v` was "No such option" in `models verify` and `models convert` alone, which -q both take."""
    if command[1] == "convert":
        torch.save({"state_dict": {"module.w": torch.zeros(2)}}, tmp_path / "c.pt")
        command = [*command, str(tmp_path / "c.pt"), str(tmp_path / "c.safetensors")]
    result = CliRunner().invoke(app, [*command, "-vv", "--registry", str(registry)] if command[1] == "verify"
                                else [*command, "-vv"])  # fmt: skip
    assert result.exit_code == 0, result.output
    if command[1] == "verify":  # -vv: the library's debug lines, as in protect
        assert "debug: loaded tiny-key from" in result.stderr, result.stderr


def test_short_version_option_as_pip_and_ruff() -> None:
    """`preempt -V` was "No such option", where pip and ruff answer it as --version."""
    assert CliRunner().invoke(app, ["-V"]).stdout == f"preempt {__version__}\n"
    code = ("import sys; sys.argv = ['preempt', '-V']; from preempt_cli.__main__ import main; main(); "
            "print('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines() == [f"preempt {__version__}", "False"], done.stderr
